"""The ``hrnet`` command line.

Each command lives beside the library code it runs: the module named in COMMANDS defines
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen command's module is
imported, so ``hrnet --help`` and ``hrnet launch`` start without loading TensorFlow.
"""
import argparse
import errno
import importlib
import logging
import os
import signal
import sys
from typing import List, Optional

from hrnet.errors import HrnetError, first_line

# name -> (module, one-line help)
COMMANDS = {
    "info": ("hrnet.info", "parameter count, GMACs and a per-stage summary of a model"),
    "import-weights": ("hrnet.import_weights", "convert an official / timm PyTorch checkpoint to a TF checkpoint"),
    "demo-data": ("hrnet.data.demo", "write the bundled demo data set (handwritten digits) as JPEG folders"),
    "convert": ("hrnet.data.convert", "convert an image tree (ImageNet layout or class folders) to TFRecords"),
    "train": ("hrnet.train.loop", "train a model on TFRecords (cpu, gpu or npu)"),
    "launch": ("hrnet.runtime.launch", "start one training process per device (1, 2, 4 or 8)"),
    "submit-job": ("hrnet.runtime.jobs", "train on several servers as a Volcano Job (ascend) or TFJob (gpu, cpu)"),
    "evaluate": ("hrnet.evaluate", "top-1 / top-5 / per-class accuracy of a checkpoint on the validation split"),
    "export": ("hrnet.export", "export a checkpoint as SavedModel, frozen graph (.pb) and ONNX"),
    "predict": ("hrnet.serving.predict", "top-k classes of image files, folders or s3:// URIs with an export"),
    "serve": ("hrnet.serving.server", "serve an export over HTTP (KServe's model server: V1 / TF Serving REST, V2)"),
    "deploy": ("hrnet.serving.deploy", "serve an export on KServe: an InferenceService made or updated, until Ready"),
}


class CliError(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


class Stopped(BaseException):
    """SIGTERM (Kubernetes stopping the pod, a cancelled run): raised in the main thread so
    that every ``with`` block on the way out runs, the output's lease released with them.
    A BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line, as every other error is (argparse prints the whole usage
    first: two dozen lines for train)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one command (importing only its module)."""
    if command not in COMMANDS:
        raise CliError("unknown command %r; commands: %s" % (command, ", ".join(COMMANDS)))
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = _Parser(prog="hrnet " + command, description=help_text)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def _usage() -> str:
    lines = ["usage: hrnet COMMAND [options]   (hrnet COMMAND --help for its options)", "", "commands:"]
    lines += ["  %-15s %s" % (name, text) for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def exit_now(code: int) -> None:
    """End the process with ``code``. After TensorFlow ran input pipelines that call back into
    Python (streamed shards), the interpreter's final garbage collection can hang destroying
    their iterators, whose threads wait for the lock it holds (seen: a run that had said its
    one error line never exited). By the time main returns, a command has written what it
    writes and released its lease: finish without that collection."""
    if "tensorflow" not in sys.modules:
        sys.exit(code)
    stream = sys.modules.get("hrnet.data.stream")
    if stream is not None:
        stream.close_all()  # its folders of shards; os._exit runs no atexit handler
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from hrnet import __version__

        print(__version__)
        return 0
    # TF's C++ start-up chatter (oneDNN, missing CUDA) buries our own messages.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    try:
        parser = build_parser(argv[0])
        args = parser.parse_args(argv[1:])
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Stopped as e:
        print("hrnet %s: stopped by %s; its lease released, what it finished kept" % (
            argv[0], signal.Signals(e.signum).name), file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise  # a bug: the traceback is what a report needs
        # Bad input or environment: say what is wrong in one line; the traceback helps nobody.
        print("hrnet %s: error: %s" % (argv[0], message), file=sys.stderr)
        return 2


_OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded: free some space or write somewhere else",
    errno.EACCES: "permission denied: check the owner and mode of the file or folder (and the user this runs as)",
    errno.EPERM: "operation not permitted: check the owner and mode of the file or folder",
    errno.EROFS: "the file system is read-only: write somewhere else",
}


def user_error(e: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, or None for a bug.

    Ours (HrnetError, CliError), bad values (ValueError, OverflowError), missing files, the
    operating system's refusals (permissions, full disks), and TensorFlow's own errors
    about files and data (a corrupt record, a full disk while checkpointing), which are
    recognised by their module so that TensorFlow is never imported here."""
    if isinstance(e, (CliError, HrnetError, ValueError, OverflowError, FileNotFoundError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in _OS_HINTS:
        where = " (%s)" % e.filename if e.filename else ""
        return _OS_HINTS[e.errno] + where
    if type(e).__module__.startswith("tensorflow") and type(e).__name__ in _TF_ERRORS:
        return "%s: %s" % (_TF_ERRORS[type(e).__name__], first_line(e)[:300])
    return None


# TensorFlow's OpError subclasses a user causes with their files or machine.
_TF_ERRORS = {
    "DataLossError": "corrupt data",
    "ResourceExhaustedError": "out of memory or disk space",
    "PermissionDeniedError": "permission denied",
    "NotFoundError": "not found",
    "FailedPreconditionError": "cannot continue",
    "OutOfRangeError": "the data ran out",
}


if __name__ == "__main__":
    sys.exit(main())

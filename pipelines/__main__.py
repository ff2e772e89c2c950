"""``python -m pipelines compile | submit | run-local``.

    python -m pipelines compile --target ascend -o hrnet-ascend.yaml
    python -m pipelines submit --host http://localhost:8080 --target ascend \\
        -p data_uri=/data/imagenet -p devices=8
    python -m pipelines run-local          # the whole pipeline here, on the demo digits
"""
import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, TextIO

from components import images
from hrnet.runtime import check_devices, cluster
from hrnet.train.config import finite_float
from pipelines import parameters
from pipelines.console import ANSI, StepLog

# run-local's defaults: the demo digits (32x32) to about 98% top-1 after 2-3 minutes of training
# on 2 cores. Digits must not be mirrored, and crops keep most of a 32 px digit (ImageNet's 8%
# would cut it away). ONNX is left out: tf2onnx adds a minute here; the SavedModel shows the export.
DEMO = dict(data_uri="", model="w18_small_v1", devices=1, batch_size=32, epochs=12.0, lr=0.05, precision="fp32",
            image_size=32, seed=1, export_onnx=False,
            train_config=dict(schedule="cosine", warmup_epochs=0.5, flip=False, area_range=[0.6, 1.0],
                              label_smoothing=0.1, log_every=15))


class UsageError(Exception):
    """Printed as one line, exit code 2."""


# The oldest KFP backend that runs the compiled pipeline: its train step mounts emptyDirs
# (/dev/shm, the data cache), which drivers before 2.3 do not know (kubeflow/pipelines#10913).
KFP_BACKEND_MINIMUM = (2, 3)


# ---------------------------------------------------------------------------- compile

def compile_pipeline(target: str, output: str, image: Optional[str] = None,
                     data_pvc: Optional[str] = images.DATA_PVC, train_devices: int = cluster.MAX_DEVICES) -> str:
    from kfp import compiler

    from pipelines.hrnet_pipeline import build_pipeline

    try:
        check_devices(train_devices)
    except ValueError as e:
        raise UsageError(f"--train-devices: {e}") from None
    compiler.Compiler().compile(build_pipeline(target, image=image, data_pvc=data_pvc, train_devices=train_devices),
                                output)
    return output


def _compile(args) -> int:
    compile_pipeline(args.target, args.output, image=args.image, data_pvc=args.data_pvc or None,
                     train_devices=args.train_devices)
    print(f"compiled the {args.target} pipeline to {args.output}")
    return 0


# ---------------------------------------------------------------------------- submit

def parse_arguments(pairs: List[str], target: str = "ascend") -> Dict[str, Any]:
    """``key=value`` pairs -> run arguments typed as the pipeline's parameters."""
    from pipelines.hrnet_pipeline import build_pipeline

    inputs = build_pipeline(target).component_spec.inputs
    casts = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "STRING": str, "BOOLEAN": _boolean, "STRUCT": _mapping,
             "Integer": int, "Float": float, "Double": float, "String": str, "Boolean": _boolean, "Dict": _mapping}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"parameter {pair!r} is not key=value")
        if key not in inputs:
            raise UsageError("unknown pipeline parameter {!r}; known: {}".format(key, ", ".join(sorted(inputs))))
        cast = casts.get(str(inputs[key].type), str)
        try:
            out[key] = cast(value)
        except ValueError as e:
            raise UsageError(f"parameter {key}={value!r} is not a valid {cast.__name__.strip('_')}"
                             + (f": {e}" if cast is _mapping else "")) from None
    return out


def _mapping(value: str) -> Dict[str, Any]:
    """A JSON object (a dict parameter such as train_config)."""
    try:
        value = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(value)


def submit(host: str, package: str, arguments: Dict[str, Any], experiment: str = "hrnet",
           run_name: Optional[str] = None, namespace: Optional[str] = None,
           service_account: Optional[str] = images.SERVICE_ACCOUNT, enable_caching: Optional[bool] = None,
           wait: bool = False, token: Optional[str] = None, cookies: Optional[str] = None) -> Dict[str, Any]:
    """Create a run of a compiled pipeline through kfp.Client; returns run id and state.
    ``token`` (a bearer token) and ``cookies`` (e.g. Dex's ``authservice_session=...``) are
    for a multi-user Kubeflow, as kfp.Client takes them; neither is ever printed."""
    import urllib3
    from kfp import Client
    from kfp_server_api.exceptions import ApiException

    # kfp.Client warns on every start that it needs a v2 API server; that is all we support.
    warnings.filterwarnings("ignore", message="This client only works", category=FutureWarning)
    try:
        client = Client(host=host, namespace=namespace, existing_token=token, cookies=cookies)
        check_backend(backend_version(client), host)
        result = client.create_run_from_pipeline_package(
            package, arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace,
            enable_caching=enable_caching, service_account=service_account or None)
        state = None
        if wait:
            state = result.wait_for_run_completion().state
    except urllib3.exceptions.HTTPError as e:
        raise UsageError(f"cannot reach Kubeflow Pipelines at {host}: {_reason(e)}") from None
    except ApiException as e:
        if e.status in (401, 403):
            hint = ("the token or cookies were refused" if token or cookies else
                    "a multi-user Kubeflow needs --token-file or --cookies-file, and --namespace")
            raise UsageError(f"Kubeflow Pipelines at {host} refused the request ({e.status} {e.reason}): "
                             f"{hint}") from None
        raise UsageError(f"Kubeflow Pipelines at {host} answered {e.status} {e.reason}: {_api_message(e)}") from None
    return {"run_id": result.run_id, "url": "{}/#/runs/details/{}".format(host.rstrip("/"), result.run_id),
            "state": state}


def backend_version(client) -> Optional[str]:
    """The KFP backend's release (e.g. "2.5.0") from its healthz, or None where it does not say.
    The API server answers ``tag_name``; through the UI's proxy (a port-forward of ml-pipeline-ui,
    Kubeflow's gateway) it is ``apiServerTagName``. kfp.Client's healthz model drops both
    fields, so the answer is read raw, with the client's own credentials."""
    response = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
    try:
        body = json.loads(response.data or b"{}")
    except ValueError:
        return None
    return body.get("tag_name") or body.get("apiServerTagName") or None


def check_backend(version: Optional[str], host: str) -> None:
    """Refuses a backend older than KFP_BACKEND_MINIMUM; says on stderr when it cannot tell, or
    when the backend is older than the kfp-kubernetes that compiled the pipeline (the steps'
    security context came with it, and an older driver may refuse or drop it)."""
    import importlib.metadata

    release = re.match(r"v?(\d+)\.(\d+)", version or "")
    if not release:
        print(f"submit: Kubeflow Pipelines at {host} does not say its version; the pipeline needs "
              f"{'.'.join(map(str, KFP_BACKEND_MINIMUM))} or later", file=sys.stderr)
        return
    found = tuple(int(part) for part in release.groups())
    if found < KFP_BACKEND_MINIMUM:
        raise UsageError(f"Kubeflow Pipelines at {host} is {version}; the pipeline needs "
                         f"{'.'.join(map(str, KFP_BACKEND_MINIMUM))} or later (its train step mounts emptyDirs, "
                         f"kubeflow/pipelines#10913)")
    compiled = importlib.metadata.version("kfp-kubernetes")
    if found < tuple(int(part) for part in compiled.split(".")[:2]):
        print(f"submit: Kubeflow Pipelines at {host} is {version}, older than the kfp-kubernetes {compiled} that "
              f"compiled the pipeline: if its steps fail on their securityContext, upgrade the backend "
              f"(docs/cluster.md)", file=sys.stderr)


def _api_message(error) -> str:
    """The API server's own message (KFP's JSON error body), on one line."""
    try:
        body = json.loads(error.body or "{}")
    except ValueError:
        body = {}
    message = body.get("message") or body.get("error") or str(error.body or "")
    return " ".join(str(message).split())[:300]


def _secret_file(path: Optional[str], what: str) -> Optional[str]:
    """The secret a file holds (a file, not a flag: a flag's value shows in `ps` and the shell's history)."""
    if not path:
        return None
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read the {what} file {path}: {e.strerror}") from None
    if not value:
        raise UsageError(f"the {what} file {path} is empty")
    return value


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None) or error
    return str(reason).split(": ", 1)[-1] if "Errno" in str(reason) else str(reason)


def _submit(args) -> int:
    arguments = parse_arguments(args.param or [], target=args.target)
    missing = [p for p in parameters.PARAMETERS if p.default is parameters.REQUIRED and p.name not in arguments]
    if missing:  # here, not as the server's 400 after the upload
        raise UsageError(f"the run needs -p {missing[0].name}=...: {missing[0].description}")
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or compile_pipeline(args.target, os.path.join(tmp, f"hrnet-{args.target}.yaml"),
                                                   image=args.image, train_devices=args.train_devices)
        if not os.path.exists(package):
            raise UsageError(f"no such pipeline package: {package}")
        run = submit(args.host, package, arguments, experiment=args.experiment, run_name=args.run_name,
                     namespace=args.namespace, service_account=args.service_account,
                     enable_caching=False if args.no_cache else None, wait=args.wait,
                     token=_secret_file(args.token_file, "token"), cookies=_secret_file(args.cookies_file, "cookies"))
    print("submitted run {}: {}".format(run["run_id"], run["url"]))
    if args.wait:
        print("run {} finished: {}".format(run["run_id"], run["state"]))
        return 0 if run["state"] == "SUCCEEDED" else 1
    return 0


# ---------------------------------------------------------------------------- run-local

# What a step in a container needs of this machine's environment: the object store's settings.
STEP_ENV = re.compile(r"^(S3_|AWS_|MINIO_|HRNET_S3_|HRNET_LEASE_|SSL_CERT_FILE$)")


def _docker_runner(workdir: str):
    """kfp.local's DockerRunner for the cpu image: on the host's network (an object store on
    localhost is reachable), with the object store's variables, as a user that may write the
    pipeline root (the image's uid 1000, which then owns it, when this runs as root)."""
    from kfp import local

    environment = {k: v for k, v in os.environ.items() if STEP_ENV.match(k)}
    if os.getuid() == 0:
        os.chown(workdir, images.RUN_AS_USER, 0)
        user = f"{images.RUN_AS_USER}:0"
    else:
        user = f"{os.getuid()}:{os.getgid()}"
        environment["HOME"] = "/tmp"  # the image's home belongs to its own user
    return local.DockerRunner(network_mode="host", environment=environment, user=user)


def run_local(workdir: str, runner: str = "subprocess", data_uri: str = "", datasets_uri: str = "",
              console: Optional[TextIO] = None, **params) -> Dict[str, Any]:
    """The cpu pipeline on this machine with kfp.local: each step a subprocess here, or
    (``runner="docker"``) a container of the cpu image. The data: the demo digits, unless
    ``data_uri`` names other data (an image tree or TFRecords); ``datasets_uri``: where
    converted records go (see the pipeline). ``console``: where the short account goes
    (pipelines.console), each step's whole output then to a file under ``workdir/logs``;
    without it kfp.local prints everything to stdout.

    Returns the evaluation metrics plus where the run's outputs (and logs) are.
    """
    from kfp import local

    from hrnet.data.demo import write_demo_data
    from hrnet.errors import IncompleteError
    from hrnet.manifest import read_manifest
    from pipelines.hrnet_pipeline import build_pipeline

    # The steps run as subprocesses of this one: keep TF's C++ start-up chatter out of their logs,
    # and the local runner's notes that the cluster settings (resources, images) do not apply here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=".*non-Python base image")
    if runner not in ("subprocess", "docker"):
        raise UsageError(f"runner must be subprocess or docker, not {runner!r}")
    workdir = os.path.abspath(workdir)
    if not data_uri:
        data_uri = os.path.join(workdir, "demo-data")
        try:
            read_manifest(data_uri)
        except (FileNotFoundError, IncompleteError):  # absent or half-written: write it (again)
            write_demo_data(data_uri)
    # A container sees only the pipeline root (mounted at the same path): it is the work folder.
    runs_dir = os.path.join(workdir, "runs") if runner == "subprocess" else workdir
    os.makedirs(runs_dir, exist_ok=True)
    before = set(os.listdir(runs_dir))
    chosen = local.SubprocessRunner(use_venv=False) if runner == "subprocess" else _docker_runner(workdir)
    local.init(runner=chosen, pipeline_root=runs_dir)
    # No retries here: they are for a lost node or a preempted pod, and a failure on this
    # machine would only come back after the backoff (150 s, then 300 s).
    pipeline = build_pipeline("cpu", data_pvc=None, train_retries=0)
    started = time.time()
    logs = None
    if console is not None:
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
        logs = StepLog(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=os.path.join(workdir, "logs")),
                       console)
        console.write(f"Running the pipeline; every step's whole log goes to {logs.folder}\n")
    with contextlib.redirect_stdout(logs) if logs else contextlib.nullcontext():
        try:
            # raises RuntimeError naming the failed step
            pipeline(data_uri=data_uri, datasets_uri=datasets_uri, **params)
        finally:
            if logs:
                logs.close()
    (run_dir,) = [os.path.join(runs_dir, name) for name in set(os.listdir(runs_dir)) - before]
    metrics_files = glob.glob(os.path.join(run_dir, "evaluate*", "evaluation", "metrics.json"))
    exported = glob.glob(os.path.join(run_dir, "export*", "exported"))
    reports = glob.glob(os.path.join(run_dir, "evaluate*", "report"))
    with open(metrics_files[0]) as f:
        metrics = json.load(f)
    report = None
    if reports:  # a copy with a name browsers open as a page
        report = os.path.join(workdir, "report.html")
        shutil.copyfile(reports[0], report)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "count": metrics["count"],
            "seconds": round(time.time() - started, 1), "run_dir": run_dir,
            "exported": exported[0] if exported else None, "report": report, "logs": logs and logs.folder}


def _run_local(args) -> int:
    from hrnet.storage import is_remote
    from hrnet.train.pipeline_args import check_pipeline_parameters

    params = {name: getattr(args, name) for name in parameters.NAMES}
    # The validate step's own check, here first: a bad value is one line and exit 2 before
    # the pipeline starts, not a failed step's traceback (the demo data stands for no source).
    data = params["data_uri"]
    check_pipeline_parameters(**parameters.validate_arguments(dict(params, data_uri=data or "demo"), "cpu",
                                                              cluster.MAX_DEVICES))
    if data and not is_remote(data) and not os.path.exists(data):
        raise UsageError(f"--data-uri {data}: no such file or folder")
    result = run_local(args.workdir, runner=args.runner, console=None if args.verbose else sys.stdout, **params)
    data = data or "the demo digits"
    print()
    print(f"HRNet {params['model']} on {data}: top-1 {100 * result['top1']:.2f}%, "
          f"top-5 {100 * result['top5']:.2f}% on {result['count']} validation images ({result['seconds']:.0f} s)")
    print(f"  run outputs:    {result['run_dir']}")
    print(f"  report:         {result['report']}")
    print(f"  exported model: {result['exported']}")
    if result["logs"]:
        print(f"  step logs:      {result['logs']}")
    return 0


# ---------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines",
                                     description="Compile, submit or run here the HRNet Kubeflow pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def target_flags(p):
        p.add_argument("--target", default="ascend", choices=images.TARGETS,
                       help="where the steps run (default ascend)")
        p.add_argument("--image", help=f"image of every step (default from components.images, e.g. "
                       f"{images.IMAGES['ascend']}; HRNET_IMAGE_REGISTRY / HRNET_IMAGE_TAG change it)")
        p.add_argument("--train-devices", type=int, default=cluster.MAX_DEVICES, metavar="N",
                       help=f"size the single train pod's CPU and memory for N devices (1, 2, 4 or 8; default "
                            f"{cluster.MAX_DEVICES}): a run may use up to N; a multi-node job's pods are sized per run")

    p = commands.add_parser("compile", help="compile the pipeline for one target to IR YAML")
    target_flags(p)
    p.add_argument("-o", "--output", required=True, help="the YAML file to write")
    p.add_argument("--data-pvc", default=images.DATA_PVC,
                   help=f"PVC mounted at {images.DATA_MOUNT} in the prepare-data step "
                        f"('' for none; default {images.DATA_PVC})")
    p.set_defaults(_run=_compile)

    p = commands.add_parser("submit", help="compile and start a run on a Kubeflow Pipelines cluster")
    target_flags(p)
    p.add_argument("--host", required=True, help="the KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument("--package", help="submit this compiled YAML instead of compiling --target")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="a pipeline parameter (repeatable), e.g. -p data_uri=/data/imagenet -p devices=8")
    p.add_argument("--experiment", default="hrnet", help="experiment name (default hrnet)")
    p.add_argument("--run-name", help="run name (default: package name and time)")
    p.add_argument("--namespace", help="the user's namespace on a multi-user KFP")
    p.add_argument("--token-file", metavar="FILE",
                   help="a file holding a bearer token for a multi-user Kubeflow (e.g. `kubectl create token` of a "
                        "ServiceAccount with access to the namespace); in a pod, kfp uses its own ServiceAccount's")
    p.add_argument("--cookies-file", metavar="FILE",
                   help="a file holding the session cookies of a Kubeflow behind Dex/oauth2-proxy, as the browser "
                        "sends them (e.g. authservice_session=...)")
    p.add_argument("--service-account", default=images.SERVICE_ACCOUNT,
                   help=f"ServiceAccount of the run's pods (default {images.SERVICE_ACCOUNT}, which may read pods "
                        "for the Ascend rank table; '' for the KFP default)")
    p.add_argument("--no-cache", action="store_true", help="run every step even if a cached result exists")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded")
    p.set_defaults(_run=_submit)

    p = commands.add_parser("run-local", help="run the whole pipeline here on the demo digits (kfp.local)")
    p.add_argument("--workdir", default="hrnet-local", help="demo data and run outputs (default ./hrnet-local)")
    p.add_argument("--runner", default="subprocess", choices=("subprocess", "docker"),
                   help="each step as a subprocess here (default), or in a container of the cpu image "
                        "(make images IMAGE_TARGETS=cpu first)")
    for param in parameters.PARAMETERS:  # the pipeline's own parameters, with the demo's values
        _add_parameter(p, param, DEMO.get(param.name, param.default))
    p.add_argument("--verbose", action="store_true",
                   help="print every step's whole output (default: a short account; the rest in step logs)")
    p.set_defaults(_run=_run_local)
    return parser


def _add_parameter(parser: argparse.ArgumentParser, param, default) -> None:
    """A flag for a pipeline parameter (pipelines/parameters.py)."""
    flag = "--" + param.name.replace("_", "-")
    # The one required parameter is the data, which run-local defaults to the demo digits.
    shown = "the demo digits" if param.default is parameters.REQUIRED else json.dumps(default)
    text = f"{param.description} (here: {shown})".replace("%", "%%")
    if param.type is bool:
        parser.add_argument(flag, dest=param.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        return
    kind = {float: finite_float, dict: _json_object}.get(param.type, param.type)
    parser.add_argument(flag, dest=param.name, type=kind, default=default, help=text)


def _json_object(text: str) -> Dict[str, Any]:
    """argparse type of a dict parameter."""
    try:
        return _mapping(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UsageError, ValueError) as e:
        print(f"python -m pipelines {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: -o on a read-only file system
        where = f"{e.filename}: " if e.filename else ""
        print(f"python -m pipelines {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # kfp.local raises RuntimeError naming the failed task; its log is above.
        print(f"python -m pipelines {args.command}: {ANSI.sub('', str(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``hrnet launch``: one process per device, each with the environment its backend needs.

    hrnet launch --nproc 8 --device npu -- hrnet train --device npu --data ... --out ...
    hrnet launch --nproc 2 -- hrnet train --data ... --out ...        # two CPU workers
    hrnet launch --nproc 2 -- python my_script.py                     # any program

Per process:

- npu: RANK_ID, RANK_SIZE, ASCEND_DEVICE_ID and DEVICE_ID (the chip's logical id), RANK_TABLE_FILE (see
  ranktable.py; written to a file when built here), JOB_ID, HCCL_CONNECT_TIMEOUT (120 s unless
  set). POD_NAME is removed: the Ascend TF adapter switches to a deploy mode that ignores
  RANK_ID when it sees it.
- cpu / gpu: TF_CONFIG naming one MultiWorkerMirroredStrategy worker per process on free
  localhost ports, or, in a worker pod of a multi-node job (TF_CONFIG set by the training
  operator), this node's share of that cluster (expand_tf_config); gpu: CUDA_VISIBLE_DEVICES =
  the rank's GPU; cpu: GPUs hidden and the CPU threads split between the workers.

Each output line is prefixed with ``[rank N]``. SIGINT / SIGTERM are forwarded to all ranks
(a second one kills them). When a rank fails the others are stopped (SIGTERM, then SIGKILL
after a grace period) and the launcher exits with the failing rank's code. The launcher
never imports TensorFlow.
"""
import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence

from hrnet.errors import HrnetError
from hrnet.runtime import DEVICES, LOCAL_PROCESSES_ENV, check_devices, ranktable, usable_cpus

log = logging.getLogger(__name__)

HCCL_CONNECT_TIMEOUT = "120"


# ----------------------------------------------------------------------------- environments

def free_ports(n: int, host: str = "127.0.0.1") -> List[int]:
    """``n`` distinct ports free right now (all held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: Sequence[int], rank: int, host: str = "localhost") -> str:
    """TF_CONFIG of worker ``rank`` in a one-machine MultiWorkerMirroredStrategy cluster."""
    return json.dumps({"cluster": {"worker": [f"{host}:{p}" for p in ports]},
                       "task": {"type": "worker", "index": rank}})


def expand_tf_config(value: str, nproc: int) -> List[str]:
    """Each local rank's TF_CONFIG when this pod is one worker of a cluster named by ``value``
    (the training operator's TF_CONFIG: worker i at ``host_i:port_i``) and runs ``nproc``
    processes: worker i becomes workers i * nproc + k at ``host_i:port_i + k``, so every
    node's ranks follow one another and rank 0 of the first node stays the chief."""
    try:
        config = json.loads(value)
        workers = config["cluster"]["worker"]
        index = int(config["task"]["index"])
        hosts = [w.rsplit(":", 1) for w in workers]
        hosts = [(h, int(p)) for h, p in hosts]
    except (ValueError, KeyError, TypeError) as e:
        raise HrnetError(f"TF_CONFIG from the environment is not a worker cluster ({type(e).__name__}: {e}); "
                         "unset it to run one machine's workers") from None
    if config.get("task", {}).get("type", "worker") != "worker" or set(config["cluster"]) - {"worker"}:
        raise HrnetError("TF_CONFIG from the environment has roles other than worker; hrnet trains with workers only")
    if not 0 <= index < len(hosts):
        raise HrnetError(f"TF_CONFIG's task index {index} is not one of its {len(hosts)} workers")
    cluster = [f"{h}:{p + k}" for h, p in hosts for k in range(nproc)]
    return [json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index * nproc + k}})
            for k in range(nproc)]


def visible_gpus(env: Mapping[str, str]) -> List[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what the driver lists."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = [v.strip() for v in value.split(",") if v.strip()]
        # CUDA stops at the first invalid entry; -1 is the usual way of hiding all GPUs.
        return ids[:ids.index("-1")] if "-1" in ids else ids
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
            return [str(i) for i, _ in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def visible_npus(env: Mapping[str, str]) -> List[int]:
    """Ascend chip ids: ASCEND_VISIBLE_DEVICES (set by the device plugin), else the /dev/davinciN nodes."""
    if env.get("ASCEND_VISIBLE_DEVICES"):
        return ranktable.visible_devices(env["ASCEND_VISIBLE_DEVICES"])
    try:
        return sorted(int(m.group(1)) for m in map(re.compile(r"davinci(\d+)$").match, os.listdir("/dev")) if m)
    except OSError:
        return []


def rank_environments(nproc: int, device: str = "cpu", env: Optional[Mapping[str, str]] = None,
                      workdir: Optional[str] = None, job_id: Optional[str] = None,
                      rank_table_timeout: float = 300.0, **rank_table_kwargs: Any) -> List[Dict[str, str]]:
    """The environment of each rank, in rank order (built from ``env``, default os.environ).

    For npu with more than one process the rank table is resolved (ranktable.resolve_rank_table,
    which takes ``api_client``, ``configuration``, ``hccn_conf`` and ``interval`` from
    ``rank_table_kwargs``) and, unless it came from RANK_TABLE_FILE, written into ``workdir``.
    """
    check_devices(nproc, "--nproc")
    if device not in DEVICES:
        raise HrnetError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    base = dict(os.environ if env is None else env)
    # Children write through pipes; unbuffered, their lines reach the log as they happen.
    base["PYTHONUNBUFFERED"] = "1"
    base[LOCAL_PROCESSES_ENV] = str(nproc)
    if device == "npu":
        return _npu_environments(nproc, base, workdir, job_id, rank_table_timeout, rank_table_kwargs)
    envs = []
    if device == "gpu":
        gpus = visible_gpus(base)
        if nproc > len(gpus):
            shown = f" (CUDA_VISIBLE_DEVICES={base['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in base else ""
            raise HrnetError(f"{nproc} GPU process(es) asked for but {len(gpus)} GPU(s) are visible{shown}")
    if base.get("TF_CONFIG"):
        # One worker pod of a multi-node job: the operator named the cluster. One process
        # keeps its TF_CONFIG as it is; more share out the worker's place.
        configs = expand_tf_config(base["TF_CONFIG"], nproc) if nproc > 1 else [base["TF_CONFIG"]]
        log.info("TF_CONFIG from the environment: this node's %d process(es) join its cluster", nproc)
    else:
        ports = free_ports(nproc) if nproc > 1 else []
        configs = [tf_config(ports, rank) if nproc > 1 else None for rank in range(nproc)]
    for rank in range(nproc):
        e = dict(base)
        if configs[rank]:
            e["TF_CONFIG"] = configs[rank]
        if device == "gpu":
            e["CUDA_VISIBLE_DEVICES"] = gpus[rank]
        else:
            # A CPU run on a GPU host would otherwise have every worker claim every GPU.
            e["CUDA_VISIBLE_DEVICES"] = "-1"
            if nproc > 1:
                # N workers each sizing their thread pools to the whole machine oversubscribe it N times.
                threads = str(max(1, usable_cpus() // nproc))
                e.setdefault("TF_NUM_INTRAOP_THREADS", threads)
                e.setdefault("OMP_NUM_THREADS", threads)
        envs.append(e)
    return envs


def _npu_environments(nproc: int, base: Dict[str, str], workdir: Optional[str], job_id: Optional[str],
                      timeout: float, rank_table_kwargs: Dict[str, Any]) -> List[Dict[str, str]]:
    visible = visible_npus(base)
    if visible and nproc > len(visible):
        raise HrnetError(f"{nproc} NPU process(es) asked for but only {len(visible)} Ascend chip(s) are visible "
                         f"({','.join(map(str, visible))})")
    if nproc == 1 and not base.get("RANK_TABLE_FILE"):
        # One chip needs no HCCL, hence no rank table (and no wait for the pod annotation).
        if not visible:
            raise HrnetError("no Ascend chip visible: ASCEND_VISIBLE_DEVICES is not set and there is no /dev/davinciN")
        ranks = [{"rank_id": "0", "device_id": str(visible[0])}]
        size, table_file = 1, None
    else:
        table, source = ranktable.resolve_rank_table(nproc, env=base, timeout=timeout, **rank_table_kwargs)
        ranks = ranktable.local_ranks(table, base)
        size = ranktable.rank_size(table)
        if source == "file":
            table_file = base["RANK_TABLE_FILE"]
        else:
            if workdir is None:
                raise HrnetError(f"a rank table was built from the {source} but there is no folder to write it to")
            table_file = ranktable.write_rank_table(table, os.path.join(workdir, "rank_table.json"))
        log.info("HCCL rank table from %s: %s", source, table_file)
    job_id = str(job_id or base.get("JOB_ID") or os.getpid())
    # The rank table names physical chips; ASCEND_DEVICE_ID / DEVICE_ID are logical ids,
    # 0..N-1 over the chips a container sees (CANN's definition). Outside a container
    # (no ASCEND_VISIBLE_DEVICES from the device plugin) the two are the same.
    logical = {str(d): str(i) for i, d in enumerate(sorted(visible))} if base.get("ASCEND_VISIBLE_DEVICES") else {}
    envs = []
    for r in ranks:
        e = dict(base)
        # Set, the adapter switches to a deploy mode that ignores RANK_ID.
        e.pop("POD_NAME", None)
        device = logical.get(str(r["device_id"]), str(r["device_id"]))
        e.update(RANK_ID=str(r["rank_id"]), RANK_SIZE=str(size), ASCEND_DEVICE_ID=device,
                 DEVICE_ID=device, JOB_ID=job_id)
        if table_file:
            e["RANK_TABLE_FILE"] = table_file
        e.setdefault("HCCL_CONNECT_TIMEOUT", HCCL_CONNECT_TIMEOUT)
        envs.append(e)
    return envs


# ----------------------------------------------------------------------------- processes

class _Rank:
    def __init__(self, rank: int, proc: "subprocess.Popen[bytes]", log_file: Optional[IO[str]]):
        self.rank = rank
        self.proc = proc
        self.log_file = log_file
        self.code: Optional[int] = None
        self.threads: List[threading.Thread] = []

    def signal(self, signum: int) -> None:
        # The rank runs in its own process group: reach the helpers it started as well.
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _pump(fd: int, prefix: str, out: IO[str], lock: threading.Lock, log_file: Optional[IO[str]]) -> None:
    """Copy a rank's output line by line with its prefix; a carriage return (progress bars) ends a line too."""
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if chunk:
            pending += chunk
            parts = _LINE_END.split(pending)
            lines, pending = parts[:-1], parts[-1]
        else:
            lines, pending = ([pending] if pending else []), b""
        if lines:
            text = "".join(prefix + line.decode("utf-8", "replace") + "\n" for line in lines)
            with lock:
                try:
                    out.write(text)
                    out.flush()
                except (OSError, ValueError):
                    pass  # our own output went away; keep draining so the rank never blocks
                if log_file is not None:
                    log_file.write(text)
                    log_file.flush()
        if not chunk:
            break
    os.close(fd)


def _parent_death_signal() -> Any:
    """A preexec_fn that has Linux send SIGTERM to a rank when the launcher dies (e.g. OOM-killed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def resolve_command(command: Sequence[str]) -> List[str]:
    """The argv to start; ``hrnet ...`` runs with this interpreter, whatever is on PATH."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise HrnetError("no command to launch; put it after --, e.g. hrnet launch --nproc 2 -- hrnet train ...")
    if command[0] == "hrnet":
        return [sys.executable, "-m", "hrnet"] + command[1:]
    if shutil.which(command[0]) is None:
        raise HrnetError(f"cannot launch {command[0]!r}: no such program")
    return command


def device_from_command(command: Sequence[str], default: str = "cpu") -> str:
    """The ``--device`` the command itself is given, so it need not be repeated for the launcher."""
    for i, arg in enumerate(command):
        if arg == "--device" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return default


def launch(nproc: int, command: Sequence[str], device: str = "cpu", env: Optional[Mapping[str, str]] = None,
           job_id: Optional[str] = None, log_dir: Optional[str] = None, grace_period: float = 20.0,
           rank_table_timeout: float = 300.0, poll_interval: float = 0.05, **rank_table_kwargs: Any) -> int:
    """Run ``command`` once per device and wait for all; returns 0, or the exit code of the first failure.

    A rank killed by a signal counts as 128 + signal; when the launcher itself was told to stop
    (SIGINT / SIGTERM) it returns 128 + that signal. ``log_dir`` also keeps each rank's output in
    ``rank-N.log`` (and a built rank table). ``rank_table_kwargs`` go to ranktable.resolve_rank_table
    (``api_client``, ``configuration``, ``hccn_conf``, ``interval``).
    """
    check_devices(nproc, "--nproc")
    if not grace_period >= 0:
        raise HrnetError(f"--grace-period must be 0 or more seconds, got {grace_period}")
    argv = resolve_command(command)
    workdir = log_dir or tempfile.mkdtemp(prefix="hrnet-launch-")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    try:
        envs = rank_environments(nproc, device, env=env, workdir=workdir, job_id=job_id,
                                 rank_table_timeout=rank_table_timeout, **rank_table_kwargs)
        return _run_ranks(argv, envs, device, log_dir, grace_period, poll_interval)
    finally:
        if not log_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_ranks(argv: List[str], envs: List[Dict[str, str]], device: str, log_dir: Optional[str],
               grace_period: float, poll_interval: float) -> int:
    log.info("launching %d process(es) on %s: %s", len(envs), device, " ".join(argv))
    ranks: List[_Rank] = []
    state = {"signal": None, "deadline": None}

    def stop_all(signum: int) -> None:
        for r in ranks:
            if r.code is None:
                r.signal(signum)

    def on_signal(signum: int, frame: Any) -> None:
        if state["signal"] is not None:
            log.warning("second %s: killing all ranks", signal.Signals(signum).name)
            stop_all(signal.SIGKILL)
            return
        log.warning("%s: passing it on to %d rank(s)", signal.Signals(signum).name, len(ranks))
        state["signal"] = signum
        state["deadline"] = time.monotonic() + grace_period
        stop_all(signum)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in handled}
    lock = threading.Lock()
    preexec = _parent_death_signal()
    try:
        for rank, e in enumerate(envs):
            label = e.get("RANK_ID", str(rank))
            log_file = open(os.path.join(log_dir, f"rank-{label}.log"), "a") if log_dir else None
            try:
                proc = subprocess.Popen(argv, env=e, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec)
            except OSError as err:
                if log_file:
                    log_file.close()
                raise HrnetError(f"cannot start rank {label} ({argv[0]}): {err}") from None
            r = _Rank(int(label), proc, log_file)
            ranks.append(r)
            prefix = f"[rank {label}] "
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(os.dup(stream.fileno()), prefix, out, lock, log_file),
                                     daemon=True)
                stream.close()
                t.start()
                r.threads.append(t)
        if state["signal"] is not None:
            stop_all(state["signal"])  # it came while the ranks were being started
        return _wait(ranks, state, stop_all, grace_period, poll_interval)
    finally:
        for r in ranks:
            if r.code is None:
                r.signal(signal.SIGKILL)
                r.code = r.proc.wait()
            # Helpers a rank left behind in its group would keep its pipes open.
            r.signal(signal.SIGKILL)
        for r in ranks:
            for t in r.threads:
                t.join(timeout=5)
            if r.log_file:
                r.log_file.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(ranks: List[_Rank], state: Dict[str, Any], stop_all: Any, grace_period: float,
          poll_interval: float) -> int:
    failure = None  # (rank, code) of the first rank that failed on its own
    while any(r.code is None for r in ranks):
        for r in ranks:
            if r.code is not None:
                continue
            code = r.proc.poll()
            if code is None:
                continue
            r.code = code
            if code == 0:
                log.info("rank %d finished", r.rank)
            elif state["signal"] is None and failure is None:
                failure = (r.rank, code)
                log.error("rank %d failed (%s); stopping the other ranks", r.rank, _describe(code))
                state["deadline"] = time.monotonic() + grace_period
                stop_all(signal.SIGTERM)
        if state["deadline"] is not None and time.monotonic() > state["deadline"]:
            alive = [r.rank for r in ranks if r.code is None]
            if alive:
                log.warning("rank(s) %s still running %.0f s after SIGTERM: killing them", alive, grace_period)
            stop_all(signal.SIGKILL)
            state["deadline"] = None
        time.sleep(poll_interval)
    if failure is not None:
        return _exit_code(failure[1])
    if state["signal"] is not None:
        return 128 + int(state["signal"])
    return 0


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1, help="processes, one per device: 1, 2, 4 or 8 (default 1)")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="backend whose environment the processes get (default: the command's own --device, "
                             "else cpu)")
    parser.add_argument("--job-id", default=None, help="Ascend JOB_ID (default: $JOB_ID, else the launcher's pid)")
    parser.add_argument("--log-dir", default=None, help="also keep each rank's output in LOG_DIR/rank-N.log")
    parser.add_argument("--grace-period", type=float, default=20.0,
                        help="seconds the ranks get to stop after SIGTERM before they are killed (default 20)")
    parser.add_argument("--rank-table-timeout", type=float, default=300.0,
                        help="seconds to wait for the HCCL rank table (pod annotation or RANK_TABLE_FILE; default 300)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run per device, after --, e.g. -- hrnet train --data ...")


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    device = args.device or device_from_command(command)
    if device not in DEVICES:
        raise HrnetError(f"unknown device {device!r} in the command; give --device cpu, gpu or npu")
    return launch(args.nproc, command, device=device, job_id=args.job_id, log_dir=args.log_dir,
                  grace_period=args.grace_period, rank_table_timeout=args.rank_table_timeout)

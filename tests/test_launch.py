"""``hrnet launch`` with small Python child programs: the environment of each rank per backend,
output prefixes, a failing rank stopping the others, signal forwarding, refused device counts."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hrnet import cli
from hrnet.errors import HrnetError
from hrnet.runtime import launch as launcher
from hrnet.runtime import ranktable

CHILD = r'''
import json, os, signal, sys, time

def rank():
    if os.environ.get("RANK_ID"):
        return int(os.environ["RANK_ID"])
    if os.environ.get("TF_CONFIG"):
        return json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    return 0

mode = sys.argv[1]
if mode == "env":
    keys = ["TF_CONFIG", "CUDA_VISIBLE_DEVICES", "RANK_ID", "RANK_SIZE", "ASCEND_DEVICE_ID", "DEVICE_ID",
            "RANK_TABLE_FILE", "JOB_ID", "HCCL_CONNECT_TIMEOUT", "POD_NAME", "PYTHONUNBUFFERED",
            "TF_NUM_INTRAOP_THREADS"]
    info = {k: os.environ.get(k) for k in keys}
    if info["RANK_TABLE_FILE"]:
        with open(info["RANK_TABLE_FILE"]) as f:
            info["rank_table"] = json.load(f)
    print(json.dumps(info))
elif mode == "lines":
    print("out one")
    print("err one", file=sys.stderr)
    sys.stdout.write("10%\r50%\r100%\n")
    sys.stdout.write("no newline at the end")
elif mode == "die":
    # rank 1 fails; the others would run for a minute (one of them deaf to SIGTERM)
    if rank() == 1:
        time.sleep(0.3)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(3)
    if sys.argv[2] == "deaf":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(sys.argv[3], "pid-%d" % rank()), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
elif mode == "signal":
    def handler(signum, frame):
        print("got signal %d" % signum, flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    print("ready", flush=True)
    time.sleep(60)
    print("never interrupted")
'''


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return [sys.executable, str(path)]


def _by_rank(text):
    """{rank: [lines]} from prefixed output; every non-empty line must carry a prefix."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\[rank (\d+)\] (.*)$", line)
        assert m, f"line without a rank prefix: {line!r}"
        out.setdefault(int(m.group(1)), []).append(m.group(2))
    return out


def _rank_json(capfd, nproc):
    out, err = capfd.readouterr()
    lines = _by_rank(out)
    assert sorted(lines) == list(range(nproc)), (out, err)
    return {r: json.loads(v[0]) for r, v in lines.items()}


# ----------------------------------------------------------------------------- refused counts

@pytest.mark.parametrize("nproc", [0, 3, 5, 16, -1, True])
def test_device_counts_other_than_1_2_4_8_are_refused(nproc, child):
    with pytest.raises(HrnetError, match="--nproc must be 1, 2, 4 or 8"):
        launcher.launch(nproc, child + ["env"])


def test_cli_refuses_a_bad_count_in_one_line(capsys, child):
    assert cli.main(["launch", "--nproc", "3", "--", *child, "env"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hrnet launch: error: --nproc must be 1, 2, 4 or 8") and "\n" not in err


@pytest.mark.parametrize("device, env, message", [
    ("gpu", {"CUDA_VISIBLE_DEVICES": "0"}, r"2 GPU process\(es\) asked for but 1 GPU\(s\) are visible"),
    ("gpu", {"CUDA_VISIBLE_DEVICES": "-1"}, "but 0 GPU"),
    ("npu", {"ASCEND_VISIBLE_DEVICES": "5"}, r"2 NPU process\(es\) asked for but only 1 Ascend chip\(s\) are visible"),
])
def test_more_devices_than_visible_are_refused(device, env, message, child):
    with pytest.raises(HrnetError, match=message):
        launcher.launch(2, child + ["env"], device=device, env=env)


def test_no_command_or_unknown_program_is_a_clear_error():
    with pytest.raises(HrnetError, match="no command to launch"):
        launcher.launch(1, ["--"])
    with pytest.raises(HrnetError, match="cannot launch 'no-such-program-xyz'"):
        launcher.launch(1, ["no-such-program-xyz"])


# ----------------------------------------------------------------------------- environments

def test_cpu_ranks_get_tf_config_on_distinct_free_ports(capfd, child):
    env = dict(os.environ, POD_NAME="train-0")
    env.pop("TF_NUM_INTRAOP_THREADS", None)
    assert launcher.launch(2, child + ["env"], device="cpu", env=env) == 0
    ranks = _rank_json(capfd, 2)
    configs = {r: json.loads(info["TF_CONFIG"]) for r, info in ranks.items()}
    workers = configs[0]["cluster"]["worker"]
    assert configs[1]["cluster"]["worker"] == workers
    assert len(set(workers)) == 2 and all(re.fullmatch(r"localhost:\d+", w) for w in workers)
    for r in (0, 1):
        assert configs[r]["task"] == {"type": "worker", "index": r}
        assert ranks[r]["CUDA_VISIBLE_DEVICES"] == "-1"
        assert ranks[r]["PYTHONUNBUFFERED"] == "1"
        assert int(ranks[r]["TF_NUM_INTRAOP_THREADS"]) >= 1
        assert ranks[r]["RANK_TABLE_FILE"] is None


def test_single_cpu_process_gets_no_tf_config(capfd, child):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    assert launcher.launch(1, child + ["env"], env=env) == 0
    assert _rank_json(capfd, 1)[0]["TF_CONFIG"] is None


def test_gpu_ranks_each_see_their_own_gpu(capfd, child):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="3,5,6,7")
    assert launcher.launch(2, child + ["env"], device="gpu", env=env) == 0
    ranks = _rank_json(capfd, 2)
    assert [ranks[r]["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["3", "5"]
    assert [json.loads(ranks[r]["TF_CONFIG"])["task"]["index"] for r in (0, 1)] == [0, 1]


def _npu_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK_TABLE_FILE", "KUBERNETES_SERVICE_HOST", "HCCL_CONNECT_TIMEOUT", "JOB_ID")}
    env.update(POD_NAME="train-0", **extra)
    return env


def test_npu_ranks_from_visible_devices_and_hccn_conf(capfd, child, tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("".join(f"address_{i}=192.168.10{i}.1\n" for i in range(8)))
    env = _npu_env(ASCEND_VISIBLE_DEVICES="4,5,6,7", SERVER_ID="10.0.0.9")
    assert launcher.launch(4, child + ["env"], device="npu", env=env, hccn_conf=str(conf), job_id="77") == 0
    ranks = _rank_json(capfd, 4)
    table = ranks[0]["rank_table"]
    assert table["server_list"][0]["server_id"] == "10.0.0.9"
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == [f"192.168.10{i}.1" for i in (4, 5, 6, 7)]
    for r, chip in zip(range(4), (4, 5, 6, 7)):
        info = ranks[r]
        assert (info["RANK_ID"], info["RANK_SIZE"]) == (str(r), "4")
        # The table names physical chip 4..7; inside the container they are logical 0..3.
        assert info["ASCEND_DEVICE_ID"] == info["DEVICE_ID"] == str(r)
        assert table["server_list"][0]["device"][r]["device_id"] == str(chip)
        assert info["rank_table"] == table
        assert info["JOB_ID"] == "77"
        assert info["HCCL_CONNECT_TIMEOUT"] == "120"
        assert info["POD_NAME"] is None
    # the rank table was written for the run only
    assert not os.path.exists(ranks[0]["RANK_TABLE_FILE"])


def test_npu_keeps_the_users_rank_table_file_and_hccl_timeout(capfd, child, tmp_path):
    table = ranktable.build_rank_table([(0, "192.168.100.1"), (1, "192.168.101.1")], "10.0.0.1")
    path = tmp_path / "hccl.json"
    path.write_text(json.dumps(table))
    env = _npu_env(RANK_TABLE_FILE=str(path), HCCL_CONNECT_TIMEOUT="600", JOB_ID="123")
    env.pop("ASCEND_VISIBLE_DEVICES", None)
    assert launcher.launch(2, child + ["env"], device="npu", env=env) == 0
    ranks = _rank_json(capfd, 2)
    for r in (0, 1):
        assert ranks[r]["RANK_TABLE_FILE"] == str(path)
        assert ranks[r]["rank_table"] == table
        assert (ranks[r]["DEVICE_ID"], ranks[r]["HCCL_CONNECT_TIMEOUT"], ranks[r]["JOB_ID"]) == (str(r), "600", "123")
        assert ranks[r]["POD_NAME"] is None
    assert path.exists()


@pytest.mark.skipif(os.path.exists("/dev/davinci0"), reason="an Ascend chip is present")
def test_npu_without_any_visible_chip_is_a_clear_error(child):
    env = {k: v for k, v in _npu_env().items() if k != "ASCEND_VISIBLE_DEVICES"}
    with pytest.raises(HrnetError, match="no Ascend chip visible"):
        launcher.launch(1, child + ["env"], device="npu", env=env)
    with pytest.raises(HrnetError, match="no HCCL rank table"):
        launcher.launch(2, child + ["env"], device="npu", env=env)


def test_single_npu_needs_no_rank_table(capfd, child):
    assert launcher.launch(1, child + ["env"], device="npu", env=_npu_env(ASCEND_VISIBLE_DEVICES="6")) == 0
    info = _rank_json(capfd, 1)[0]
    assert (info["RANK_ID"], info["RANK_SIZE"], info["DEVICE_ID"], info["ASCEND_DEVICE_ID"]) == ("0", "1", "0", "0")
    assert info["RANK_TABLE_FILE"] is None and info["POD_NAME"] is None


def test_npu_rank_table_from_the_pod_annotation(capfd, child):
    from pod_api import ANNOTATION_VALUE, FakeApiServer

    env = _npu_env(HOSTNAME="train-0", POD_NAMESPACE="kubeflow", KUBERNETES_SERVICE_HOST="10.96.0.1",
                   ASCEND_VISIBLE_DEVICES="4,5")
    with FakeApiServer(annotate_after=2) as api:
        code = launcher.launch(2, child + ["env"], device="npu", env=env, configuration=api.configuration(),
                               interval=0.05)
    assert code == 0
    ranks = _rank_json(capfd, 2)
    # Physical chips 4 and 5 in the table; logical 0 and 1 in the container.
    assert [ranks[r]["DEVICE_ID"] for r in (0, 1)] == ["0", "1"]
    assert ranks[0]["rank_table"] == ranktable.from_annotation(ANNOTATION_VALUE)
    assert [d["device_id"] for d in ranks[0]["rank_table"]["server_list"][0]["device"]] == ["4", "5"]


# ----------------------------------------------------------------------------- output and failures

def test_each_output_line_is_prefixed_and_kept_in_the_log_dir(capfd, child, tmp_path):
    assert launcher.launch(2, child + ["lines"], log_dir=str(tmp_path / "logs")) == 0
    out, err = capfd.readouterr()
    for r in (0, 1):
        assert _by_rank(out)[r] == ["out one", "10%", "50%", "100%", "no newline at the end"]
        assert _by_rank(err)[r] == ["err one"]
        kept = (tmp_path / "logs" / f"rank-{r}.log").read_text().splitlines()
        assert sorted(kept) == sorted(f"[rank {r}] {s}" for s in
                                      ["out one", "err one", "10%", "50%", "100%", "no newline at the end"])


def _assert_gone(pid_file):
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("how, code", [("exit", 3), ("kill", 128 + signal.SIGKILL)])
def test_a_failing_rank_stops_the_others_and_sets_the_exit_code(how, code, child, tmp_path, capfd):
    start = time.monotonic()
    assert launcher.launch(2, child + ["die", how, str(tmp_path)]) == code
    assert time.monotonic() - start < 20
    _assert_gone(tmp_path / "pid-0")


def test_ranks_deaf_to_sigterm_are_killed_after_the_grace_period(child, tmp_path, capfd):
    start = time.monotonic()
    assert launcher.launch(4, child + ["die", "deaf", str(tmp_path)], grace_period=0.5) == 3
    assert time.monotonic() - start < 20
    for r in (0, 2, 3):
        _assert_gone(tmp_path / f"pid-{r}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_every_rank(signum, child):
    proc = subprocess.Popen([sys.executable, "-m", "hrnet", "launch", "--nproc", "2", "--", *child, "signal"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = 0
        while ready < 2:
            line = proc.stdout.readline()
            assert line, f"launcher ended early: {proc.stderr.read()}"
            ready += line.endswith("] ready\n")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    got = _by_rank(out)
    assert got == {0: [f"got signal {signum}"], 1: [f"got signal {signum}"]}, (out, err)


# ----------------------------------------------------------------------------- command line and imports

def test_hrnet_commands_run_with_this_interpreter(capfd):
    assert launcher.resolve_command(["--", "hrnet", "train"]) == [sys.executable, "-m", "hrnet", "train"]
    assert launcher.launch(1, ["hrnet", "--version"]) == 0
    from hrnet import __version__

    assert _by_rank(capfd.readouterr().out) == {0: [__version__]}


def test_cli_passes_the_command_after_the_double_dash(capfd, child):
    # The command's own flags stay the command's, even where the launcher has the same name.
    assert cli.main(["launch", "--nproc", "2", "--", *child, "lines", "--nproc", "3"]) == 0
    out = capfd.readouterr().out
    assert sorted(_by_rank(out)) == [0, 1]


def test_device_defaults_to_the_commands_own_device_flag():
    assert launcher.device_from_command(["hrnet", "train", "--device", "npu"]) == "npu"
    assert launcher.device_from_command(["hrnet", "train", "--device=gpu"]) == "gpu"
    assert launcher.device_from_command(["hrnet", "train"]) == "cpu"


def _imports(python):
    code = ("import sys; import hrnet.runtime.launch, hrnet.runtime.ranktable; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'kubernetes')))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_launcher_imports_neither_tensorflow_nor_kubernetes():
    result = _imports(sys.executable)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_launcher_imports_on_python_3_9():
    """The Ascend image runs Python 3.9: the launcher must import there (no TF needed for that)."""
    pyenv = glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9"))
    candidates = [shutil.which("python3.9")] + sorted(pyenv)
    working = [p for p in candidates if p and subprocess.run([p, "-c", "pass"], capture_output=True).returncode == 0]
    if not working:
        pytest.skip("no Python 3.9 here")
    result = _imports(working[0])
    assert result.returncode == 0, result.stderr

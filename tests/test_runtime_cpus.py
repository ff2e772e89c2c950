"""How hrnet uses the CPU: usable_cpus is a pod's CPU limit, not the node's core count;
TensorFlow runs oneDNN's kernels on any x86 CPU from TF 2.9 on, unless the user said otherwise;
a 16-bit precision on a CPU without instructions for it is warned about."""
import builtins
import io
import logging
import os
import platform
import subprocess
import sys

import pytest

from hrnet import compat
from hrnet.runtime import devices, usable_cpus


def _fake_files(monkeypatch, files):
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path in files:
            if files[path] is None:
                raise FileNotFoundError(path)
            return io.StringIO(files[path])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_cgroup_v2_quota_caps_the_affinity(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    _fake_files(monkeypatch, {"/sys/fs/cgroup/cpu.max": "1500000 100000\n"})
    assert usable_cpus() == 15


def test_cgroup_v1_quota_and_no_limit(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    _fake_files(monkeypatch, {"/sys/fs/cgroup/cpu.max": None, "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "250000",
                              "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"})
    assert usable_cpus() == 3
    _fake_files(monkeypatch, {"/sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert usable_cpus() == 8


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="hrnet sets it on x86 only")
@pytest.mark.parametrize("setting, expected", [(None, ("1", "True")), ("0", ("0", "False"))])
def test_hrnet_turns_onednn_on_before_tensorflow_loads_unless_the_user_set_it(setting, expected):
    # TensorFlow itself turns oneDNN on only on CPUs with AVX512-VNNI / BF16 / AMX: on those the
    # variable shows that hrnet set it, on others (AVX2) TensorFlow's own answer does too.
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    script = ("import os, hrnet, tensorflow\n"
              "from tensorflow.python.util import _pywrap_util_port\n"
              "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], _pywrap_util_port.IsMklEnabled())\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert tuple(out.stdout.split()[-2:]) == expected


@pytest.mark.parametrize("precision, flags, warned", [
    ("bf16", "fpu sse2 avx2 fma", True),  # x86 without bf16 instructions (this project's AVX2 EPYC)
    ("bf16", "avx2 avx512f avx512_bf16", False),
    ("bf16", "fp asimd bf16", False),  # aarch64's "Features"
    ("mixed_fp16", "avx2 avx512_bf16", True),
    ("fp32", "sse2", False),
    ("bf16", None, False),  # no /proc/cpuinfo: no guess
])
def test_a_16_bit_precision_the_cpu_would_emulate_is_warned_about(monkeypatch, caplog, precision, flags, warned):
    key = "Features" if flags and "asimd" in flags else "flags"
    _fake_files(monkeypatch, {"/proc/cpuinfo": None if flags is None else f"processor\t: 0\n{key}\t\t: {flags}\n"})
    try:
        with caplog.at_level(logging.WARNING, logger=devices.__name__):
            devices.setup("cpu", precision)
    finally:
        compat.set_mixed_precision("float32")
    assert ("slower than --precision fp32" in caplog.text) == warned, caplog.text

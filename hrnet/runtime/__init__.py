"""Where training runs: device backends (devices.py), the one-process-per-device launcher
(launch.py), the HCCL rank table for Ascend (ranktable.py), multi-node jobs on Volcano or
the training operator (jobs.py) and the cluster's names and pod shape (cluster.py).

Nothing heavy is imported here, so ``hrnet launch`` starts without TensorFlow. The device
and precision rules live here, once, for the config, the launcher and the backends.
"""
import math
import os
from typing import Any, Optional, Tuple

from hrnet.errors import BadValue

DEVICES = ("cpu", "gpu", "npu")
# How many training processes `hrnet launch` runs on this server: they share its disk
# (TrainConfig.data_cache_gb is per server).
LOCAL_PROCESSES_ENV = "HRNET_LOCAL_PROCESSES"
# Devices (one training process each) on one server: the shares its 8 chips divide into.
DEVICES_PER_SERVER = (1, 2, 4, 8)
PRECISIONS = ("fp32", "mixed_fp16", "bf16")
# The Ascend adapter's precision modes (npu_bridge names, also accepted by npu_device).
NPU_PRECISION_MODES = ("allow_mix_precision", "allow_fp32_to_fp16", "force_fp32", "must_keep_origin_dtype")
# CPU instructions that compute in a precision's 16-bit type (x86 /proc/cpuinfo "flags",
# aarch64 "Features"). Without any of them TensorFlow converts to float32 and back around each
# op: on an AVX2 AMD EPYC, HRNet-W18 inference (batch 8) ran at 9.2 img/s under mixed_bfloat16
# and 10.4 under mixed_float16 against 11.3 in float32, and bf16 training (batch 32) at 0.2
# img/s against 2.9.
CPU_16BIT_INSTRUCTIONS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"),
                          "mixed_fp16": ("avx512_fp16", "amx_fp16", "fphp")}


def resolve_precision(device: str, precision: Optional[str] = None,
                      precision_mode: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(precision, precision_mode) of a run on ``device``: mixed_fp16 on npu and fp32
    elsewhere by default; on npu the adapter's mode follows the precision unless given.
    ValueError for a combination that cannot run."""
    precision = precision or ("mixed_fp16" if device == "npu" else "fp32")
    if precision not in PRECISIONS:
        raise ValueError("precision must be one of %s, got %r" % (", ".join(PRECISIONS), precision))
    if device == "npu" and precision == "bf16":
        raise ValueError("Ascend 910 has no bf16; use precision mixed_fp16 or fp32 on npu")
    if precision_mode is not None:
        if precision_mode not in NPU_PRECISION_MODES:
            raise ValueError("precision_mode must be one of %s, got %r" % (", ".join(NPU_PRECISION_MODES),
                                                                          precision_mode))
        if device != "npu":
            raise ValueError("precision_mode is an Ascend adapter option; use it with device npu")
    elif device == "npu":
        precision_mode = "allow_mix_precision" if precision == "mixed_fp16" else "allow_fp32_to_fp16"
    return precision, precision_mode


def cpu_flags() -> frozenset:
    """The CPU's instruction-set extensions as Linux lists them; empty where it does not."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_precision_warning(precision: str) -> Optional[str]:
    """Why ``precision`` would train slower than fp32 on this CPU, or None."""
    wanted, flags = CPU_16BIT_INSTRUCTIONS.get(precision), cpu_flags()
    if not wanted or not flags or flags & set(wanted):
        return None
    return ("--precision %s on a CPU without %s instructions (%s): TensorFlow converts to float32 and back "
            "around each op, so this runs slower than --precision fp32" % (precision, precision.split("_")[-1],
                                                                         ", ".join(wanted)))


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a pod's
    CPU limit), which os.cpu_count() ignores (it reports the whole node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = None
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, period = f.read().split()[:2]
            if q != "max":
                quota = int(q) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                period = int(f.read())
            if q > 0 and period > 0:
                quota = q / period
        except (OSError, ValueError):
            pass
    if quota:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def check_devices(value: Any, name: str = "devices") -> int:
    """The one check of a count of devices on one server (the launcher's --nproc, the
    pipeline's and a job's devices); BadValue naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in DEVICES_PER_SERVER:
        raise BadValue(f"{name} must be 1, 2, 4 or 8 (one process per device, as the chips of a server are shared "
                       f"out), got {value!r}")
    return value


def check_nodes(value: Any) -> int:
    """The one check of a count of servers (the pipeline's and a job's nodes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadValue(f"nodes must be 1 or more (servers, each with `devices` devices), got {value!r}")
    return value

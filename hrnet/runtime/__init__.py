"""Where training runs: device backends (devices.py), the one-process-per-device launcher
(launch.py), the HCCL rank table for Ascend (ranktable.py), multi-node jobs on Volcano or
the training operator (jobs.py) and the cluster's names and pod shape (cluster.py).

Nothing heavy is imported here, so ``hrnet launch`` starts without TensorFlow. The device
and precision rules live here, once, for the config, the launcher and the backends.
"""
import math
import os
from typing import Optional, Tuple

DEVICES = ("cpu", "gpu", "npu")
PRECISIONS = ("fp32", "mixed_fp16", "bf16")
# The Ascend adapter's precision modes (npu_bridge names, also accepted by npu_device).
NPU_PRECISION_MODES = ("allow_mix_precision", "allow_fp32_to_fp16", "force_fp32", "must_keep_origin_dtype")


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

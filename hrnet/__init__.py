"""HRNet image classification: models, data, training, evaluation and export for
CPU, GPU and Ascend NPU, as used by the Kubeflow pipeline in ``pipelines/``."""
import os
import platform
from importlib import metadata

__version__ = "0.1.0"


def _tensorflow_version():
    """The installed TensorFlow's (major, minor), from its package metadata (without importing
    it), or None."""
    for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-intel"):
        try:
            return tuple(int(p) for p in metadata.version(dist).split(".")[:2])
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


# TensorFlow turns its oneDNN kernels on by itself only on x86 CPUs with AVX512-VNNI,
# AVX512-BF16 or AMX, and leaves AVX2 ones (AMD before Zen 4, Intel before Cascade Lake) on
# Eigen's: on a 2-core AMD EPYC (Zen 3), HRNet-W18 in float32 inferred 1.34x and trained 1.47x
# faster with oneDNN, the demo's w18_small_v1 at 32x32 trained 5x faster. TensorFlow reads the
# switch once, when it is imported, so it is set here, before any part of hrnet imports it; a
# value the user set wins (0 turns oneDNN off). Only from TF 2.9, which made oneDNN its own
# default on those CPUs: the Ascend image's TF 2.6.5 with oneDNN died of SIGFPE in its first
# training step on that EPYC. Not on ARM (the Kunpeng hosts of Ascend servers), where nothing
# was measured.
if platform.machine().lower() in ("x86_64", "amd64") and (_tensorflow_version() or (0,)) >= (2, 9):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

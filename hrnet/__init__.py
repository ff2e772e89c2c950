"""HRNet image classification: models, data, training, evaluation and export for
CPU, GPU and Ascend NPU, as used by the Kubeflow pipeline in ``pipelines/``."""
import os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX512-VNNI, AVX512-BF16
# or AMX, and leaves AVX2 CPUs (AMD before Zen 4, Intel before Cascade Lake) on Eigen's:
# HRNet-W18 in float32 on a 2-core AMD EPYC (Zen 3) inferred 1.34x and trained 1.47x faster
# with oneDNN. TensorFlow reads the switch once, when it is imported, so it is set here, before
# any part of hrnet imports it; a value the user set wins (0 turns oneDNN off).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

"""HRNet image classification: models, data, training, evaluation and export for
CPU, GPU and Ascend NPU, as used by the Kubeflow pipeline in ``pipelines/``."""
__version__ = "0.1.0"

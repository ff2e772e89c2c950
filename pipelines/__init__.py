"""The HRNet Kubeflow pipeline and ``python -m pipelines compile | submit | run-local``."""

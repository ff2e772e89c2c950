"""Where training runs: device backends (devices.py), the one-process-per-device launcher
(launch.py) and the HCCL rank table for Ascend (ranktable.py).

Nothing is imported here, so ``hrnet launch`` starts without TensorFlow.
"""

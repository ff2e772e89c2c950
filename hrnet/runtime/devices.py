"""Device backends for training: cpu, gpu (tf.distribute) and npu (the Ascend TF adapter).

One process per device, started by ``hrnet launch`` with the environment of its backend:

- cpu / gpu: TF_CONFIG naming several workers -> MultiWorkerMirroredStrategy (synchronous
  data parallel; gradients all-reduced inside ``apply_gradients``). One process driving all
  visible GPUs (``mirrored=True``) -> MirroredStrategy. Otherwise the default strategy.
- npu: ``npu_device``, the adapter of the CANN TF 2.6 image. It is imported here and
  nowhere else, and only when the npu backend is chosen. The adapter is not a
  tf.distribute strategy: this process is rank RANK_ID of RANK_SIZE (set by the
  launcher, with RANK_TABLE_FILE), gradients are all-reduced explicitly
  (``npu.distribute.all_reduce``), the initial variables are broadcast from rank 0
  (``npu.distribute.broadcast``), float16 overflow is detected by the NPU loss-scale
  optimizer (Ascend 910 saturates instead of producing inf), the precision is set
  graph-wide by ``precision_mode`` rather than by a Keras policy, and the training loop's
  steps per call are the adapter's loop size (``npu.set_npu_loop_size``, loop sinking).

What is exercised here: the cpu backends for real (one process, and two processes under
MultiWorkerMirroredStrategy); the npu backend only through a fake ``npu_device`` module
that records the calls made to it (tests/test_train.py), which checks that this seam
calls the adapter API as its documentation says (npu.global_options(),
npu.open().as_default(), npu.distribute.all_reduce / broadcast,
npu.train.optimizer.NpuLossScaleOptimizer, npu.set_npu_loop_size), not that the adapter
or HCCL behave. No Ascend hardware, CANN or GPU is available where this was written: the
gpu and npu paths are unverified on real devices.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import tensorflow as tf

from hrnet import compat
from hrnet.errors import HrnetError
from hrnet.runtime import DEVICES, cpu_precision_warning, resolve_precision

log = logging.getLogger(__name__)

KERAS_POLICY = {"fp32": "float32", "mixed_fp16": "mixed_float16", "bf16": "mixed_bfloat16"}
# precision_mode values under which the adapter computes in float16 and loss scaling is needed.
NPU_FP16_MODES = ("allow_mix_precision", "allow_fp32_to_fp16")


@dataclass
class Backend:
    """What the training loop needs to know about where it runs."""

    device: str
    strategy: Any  # tf.distribute.Strategy
    num_replicas: int  # devices taking part in one synchronous step, all workers together
    worker_index: int  # this process's input shard (and rank)
    num_workers: int  # processes
    loss_scaling: bool
    npu: Any = None  # the npu_device module, on the npu backend only

    @property
    def is_chief(self) -> bool:
        """Rank 0 writes checkpoints, logs and manifests."""
        return self.worker_index == 0

    @property
    def replicas_in_step_fn(self) -> int:
        """Replicas whose per-replica losses tf.distribute sums: all of them under a
        strategy; one on the npu backend, where the gradients are averaged explicitly."""
        return self.strategy.num_replicas_in_sync

    def wrap_optimizer(self, optimizer):
        if not self.loss_scaling:
            return optimizer
        if self.npu is not None:
            return self.npu.train.optimizer.NpuLossScaleOptimizer(optimizer, dynamic=True)
        return compat.keras.mixed_precision.LossScaleOptimizer(optimizer)

    def all_reduce_gradients(self, grads: List) -> List:
        """Average gradients over the ranks where the strategy does not (npu)."""
        if self.npu is not None and self.num_workers > 1:
            return self.npu.distribute.all_reduce(list(grads), "mean")
        return grads

    def broadcast_variables(self, variables: List) -> None:
        """Make every rank start from rank 0's values (npu; MultiWorkerMirroredStrategy
        already broadcasts initial values when it creates variables)."""
        if self.npu is not None and self.num_workers > 1:
            self.npu.distribute.broadcast([compat.tf_variable(v) for v in variables], root_rank=0)

    @property
    def sinks_loops(self) -> bool:
        """The npu adapter sends a loop's batches ahead to the device and runs the whole loop
        there: it must run exactly the loop size it was told (no early exit)."""
        return self.npu is not None

    def set_loop_size(self, steps: int) -> None:
        """Tell the adapter how many steps the next call of the training loop runs."""
        if self.npu is not None:
            self.npu.set_npu_loop_size(steps)

    def describe(self) -> str:
        name = type(self.strategy).__name__
        return "%s, %d worker(s) x %d device(s) = %d replica(s) (%s), rank %d" % (
            self.device, self.num_workers, max(1, self.num_replicas // self.num_workers),
            self.num_replicas, name, self.worker_index)


def tf_config_workers(env=None) -> int:
    """Number of workers named in TF_CONFIG (0 when unset)."""
    env = os.environ if env is None else env
    raw = env.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except ValueError as e:
        raise HrnetError("TF_CONFIG is not valid JSON: %s" % e) from e
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def setup(device: str, precision: Optional[str] = None, precision_mode: Optional[str] = None,
          mirrored: bool = False) -> Backend:
    """Pick the backend for ``device``; call before any other TensorFlow work (the
    strategies and the NPU device must exist before the first op runs). ``precision`` /
    ``precision_mode``: as hrnet.runtime.resolve_precision resolves them."""
    if device not in DEVICES:
        raise HrnetError("unknown device %r; choose %s" % (device, ", ".join(DEVICES)))
    try:
        precision, precision_mode = resolve_precision(device, precision, precision_mode)
    except ValueError as e:
        raise HrnetError(str(e)) from None
    if device == "npu":
        return _setup_npu(precision_mode)
    if device == "cpu":
        # "cpu" means the CPU even where a GPU is present.
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised in this process (a library caller): leave it
            log.warning("TensorFlow is already initialised; GPUs stay visible to this --device cpu run")
        slow = cpu_precision_warning(precision)
        if slow:
            log.warning(slow)
    elif not tf.config.list_physical_devices("GPU"):
        raise HrnetError("--device gpu, but TensorFlow sees no GPU (CUDA_VISIBLE_DEVICES=%s; is this the GPU "
                         "image with tensorflow[and-cuda]?)" % os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    compat.set_mixed_precision(KERAS_POLICY[precision])

    workers = tf_config_workers()
    if workers > 1:
        if mirrored:
            raise HrnetError("--mirrored drives all GPUs from one process; TF_CONFIG names %d worker processes "
                             "(hrnet launch): use one or the other" % workers)
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if device == "gpu"
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
        resolver = strategy.cluster_resolver
        worker_index = int(resolver.task_id or 0)
        num_workers = workers
    elif mirrored:
        if device != "gpu":
            raise HrnetError("--mirrored is for several GPUs in one process; use it with --device gpu")
        strategy = tf.distribute.MirroredStrategy()
        worker_index, num_workers = 0, 1
    else:
        strategy = tf.distribute.get_strategy()
        worker_index, num_workers = 0, 1
    return Backend(device=device, strategy=strategy, num_replicas=strategy.num_replicas_in_sync,
                   worker_index=worker_index, num_workers=num_workers, loss_scaling=precision == "mixed_fp16")


def _setup_npu(precision_mode: str) -> Backend:
    try:
        import npu_device as npu
    except ImportError as e:
        raise HrnetError(
            "--device npu needs the Ascend TensorFlow adapter (the npu_device package of the CANN TF 2.6 image, "
            "images/ascend); it cannot be imported here: %s" % e
        ) from e
    rank_size = int(os.environ.get("RANK_SIZE", "1") or 1)
    if rank_size > 1:
        missing = [k for k in ("RANK_ID", "RANK_TABLE_FILE") if not os.environ.get(k)]
        if missing:
            raise HrnetError("RANK_SIZE=%d but %s not set: start multi-device NPU training with `hrnet launch "
                             "--device npu --nproc N -- hrnet train ...`" % (rank_size, ", ".join(missing)))
    # The adapter rewrites the whole graph to this precision; a Keras mixed policy on top
    # would cast twice.
    compat.set_mixed_precision("float32")
    npu.global_options().precision_mode = precision_mode
    handle = npu.open().as_default()
    rank_id = int(getattr(handle, "worker_id", os.environ.get("RANK_ID", "0")) or 0)
    workers = int(getattr(handle, "workers_num", rank_size) or rank_size)
    log.info("Ascend NPU %s: rank %d of %d, precision_mode %s", os.environ.get("ASCEND_DEVICE_ID", "0"),
             rank_id, workers, precision_mode)
    return Backend(device="npu", strategy=tf.distribute.get_strategy(), num_replicas=workers,
                   worker_index=rank_id, num_workers=workers,
                   loss_scaling=precision_mode in NPU_FP16_MODES, npu=npu)

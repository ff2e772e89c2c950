"""``hrnet train``: the training loop (custom, tf.function, any tf.distribute strategy or the NPU).

    hrnet train --data DIR --out DIR --model w18 [--epochs 100 | --train-steps N] ...

One step: forward in training mode, softmax cross-entropy (optionally label-smoothed)
averaged over the global batch, plus L2 over all trainable weights, backward, gradients
averaged over the devices, SGD with Nesterov momentum. The lr is a pure function of the
step (hrnet.train.schedules) and the step is part of the checkpoint, so a resumed run
continues the schedule exactly where it stopped.

The output folder holds the checkpoint contract (see the team brief): train_config.yaml,
labels.txt, ckpt-<step> (tf.train.CheckpointManager: step, model, optimizer slots),
weights.* (portable, hrnet.weights), history.jsonl, logs/ (TensorBoard) and, last,
manifest.json. Running the same command again resumes from the latest checkpoint; a
finished run is left as it is.
"""
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np

from hrnet import storage
from hrnet.errors import HrnetError
from hrnet.fileio import atomic_write, replacing
from hrnet.train.config import CONFIG_FILE, TrainConfig, check_resumable, from_args, load_saved
from hrnet.train.config import add_arguments as _config_arguments

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
LABELS = "labels.txt"
WEIGHTS = "weights"
# The weights with the best validation top-1 so far (a weights prefix, like WEIGHTS) and
# what validation found for them; written in this order, so a crash between the two is
# healed by the validation a resumed run repeats.
BEST = "best"
BEST_INFO = "best.json"
CHECKPOINT_NAME = "ckpt"


class NonFiniteLossError(HrnetError):
    """The loss became NaN or Inf and loss scaling could not absorb it."""


# ----------------------------------------------------------------------------- data seam

def _splits(cfg: TrainConfig):
    """The splits a run reads: validation too unless it was switched off."""
    return ("train",) if cfg.eval_every == 0 else ("train", "validation")


def _data_info(cfg: TrainConfig, data_dir: str):
    """hrnet.data.DatasetInfo: classes, label offset, counts and files per split."""
    from hrnet import data

    return data.dataset_info(data_dir, num_classes=cfg.num_classes, label_offset=cfg.label_offset,
                             verify=cfg.verify_data, splits=_splits(cfg))


def _train_input(cfg: TrainConfig, info, batch_size: int, worker_index: int, num_workers: int,
                 start_record: int = 0):
    """This worker's share of the training stream, batched per device (hrnet.data), from
    ``start_record`` on (what the steps before a resume consumed)."""
    from hrnet import data

    return data.train_dataset(
        info, batch_size=batch_size, image_size=cfg.image_size, worker_index=worker_index,
        num_workers=num_workers, label_offset=cfg.label_offset, num_classes=cfg.num_classes,
        augment=cfg.augment(), seed=cfg.seed,
        start_record=start_record,
    )


# ----------------------------------------------------------------------------- helpers

def set_seed(seed: Optional[int]) -> None:
    """Seed Python, numpy and TF (Keras 3 initializers draw from Python's random)."""
    if seed is None:
        return
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return "%d:%02d:%02d" % (seconds // 3600, seconds % 3600 // 60, seconds % 60)


def _truncate_history(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (the killed run's tail)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                kept.append(ln)
        except (ValueError, KeyError):
            continue  # a line cut by the kill
    atomic_write(path, "".join(kept))


def _truncate_events(logs_dir: str, step: int) -> None:
    """Drop TensorBoard points after the checkpoint being resumed (the killed run's tail),
    so that the resumed run's points do not overlap them."""
    if not os.path.isdir(logs_dir):
        return
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    for name in sorted(os.listdir(logs_dir)):
        path = os.path.join(logs_dir, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        kept, dropped = [], 0
        try:
            for raw in tf.data.TFRecordDataset(path):
                event = event_pb2.Event.FromString(raw.numpy())
                if event.HasField("summary") and event.step > step:
                    dropped += 1
                else:
                    kept.append(raw.numpy())
        except tf.errors.DataLossError:
            pass  # the record the kill cut short
        if dropped:
            with replacing(path) as tmp, tf.io.TFRecordWriter(tmp) as w:
                for raw in kept:
                    w.write(raw)


def _write_labels(out_dir: str, data_dir: str, info) -> None:
    """labels.txt of the data set; for slim-made records without one, from the class names."""
    src = os.path.join(data_dir, LABELS)
    dst = os.path.join(out_dir, LABELS)
    if os.path.exists(src):
        shutil.copyfile(src, dst)
        return
    with open(dst, "w") as f:
        for i, (name, text) in enumerate(zip(info.class_names, info.class_texts)):
            f.write("%d\t%s\t%s\n" % (i + info.label_offset, name, text))


def _stage_data(data: str, chief: bool, splits) -> str:
    """The data set's ``splits`` as a local folder (``data``: records, or a reference to
    them). Remote data: the ranks of one machine share the cache, so they take turns (a
    file lock); the first downloads and the others find the copy. Only rank 0 re-hashes
    it, the others check sizes (ImageNet is 150 GB)."""
    import fcntl

    from hrnet.data import reference

    uri = reference.resolve(data)
    if not storage.is_remote(uri):
        return storage.local_input(uri)

    lock_path = storage.cache_path(uri).rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return reference.stage(uri, splits, verify=chief)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# TensorBoard tag -> history.jsonl key.
TRAIN_SCALARS = {"train/" + k: k for k in ("loss", "top1", "lr", "images_per_sec", "loss_scale")}
VALIDATION_SCALARS = {"validation/top1": "val_top1", "validation/top5": "val_top5"}


def _write_scalars(writer, step: int, values: Dict[str, Any], tags: Dict[str, str]) -> None:
    """TensorBoard scalars through tf.summary.write with the scalars plugin's metadata:
    tf.summary.scalar needs the tensorboard package, which TF 2.21 no longer installs."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    with writer.as_default():
        for tag, key in tags.items():
            if key in values:
                tf.summary.write(tag, tf.constant(float(values[key]), tf.float32), step=step,
                                 metadata=metadata.SerializeToString())
    writer.flush()


def _read_history(path: str):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _read_best(directory: str, start_step: int) -> Optional[Dict[str, Any]]:
    """The best validation so far of the run being resumed at ``start_step``."""
    path = os.path.join(directory, BEST_INFO)
    if not os.path.exists(path) or not os.path.exists(os.path.join(directory, BEST + ".index")):
        return None
    with open(path) as f:
        best = json.load(f)
    if best["step"] > start_step:  # from after the checkpoint resumed: that future is being redone
        log.warning("the best weights (step %d) are newer than the checkpoint resumed (step %d): they are "
                    "forgotten, and the best is found again", best["step"], start_step)
        return None
    return best


# ----------------------------------------------------------------------------- training

def train(config, force: bool = False) -> Dict[str, Any]:
    """Train (or resume) as ``config`` says; returns the checkpoint manifest.

    config: a TrainConfig, or a dict of its fields. ``force``: take the output's lease from
    another writer (storage.Lease).
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    cfg.validate()
    # TF's own INFO lines (collective set-up, checkpoint sharding) drown the progress lines.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # Device set-up first: strategies and the NPU must exist before any other TF op runs.
    from hrnet.runtime import devices

    backend = devices.setup(cfg.device, cfg.precision, cfg.precision_mode, cfg.mirrored)
    if backend.is_chief:
        with storage.local_output(cfg.out, kind="checkpoint", force=force) as out_dir:
            if storage.is_remote(cfg.out):
                storage.restore(cfg.out, out_dir)  # a pod restarted elsewhere resumes from the bucket
            return _train(cfg, backend, out_dir, out_dir)
    # Other ranks read the checkpoint to resume from (a private copy when it is remote) and
    # take part in every save, since reading mirrored variables is a collective op under
    # MultiWorkerMirroredStrategy, but they write into a scratch folder and publish nothing.
    scratch = tempfile.mkdtemp(prefix="hrnet-rank%d-" % backend.worker_index)
    try:
        read_dir = cfg.out
        if storage.is_remote(cfg.out):
            read_dir = os.path.join(scratch, "restored")
            storage.restore(cfg.out, read_dir)
        return _train(cfg, backend, read_dir, os.path.join(scratch, "checkpoints"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(cfg: TrainConfig, backend, out_dir: str, write_dir: str) -> Dict[str, Any]:
    """The run itself. out_dir: the local checkpoint folder (rank 0 writes it, every rank
    resumes from it); write_dir: where this rank's checkpoints go (out_dir on rank 0)."""
    from hrnet import configs
    from hrnet.manifest import MANIFEST, read_manifest

    data_dir = _stage_data(cfg.data, backend.is_chief, _splits(cfg))
    info = _data_info(cfg, data_dir)
    if not info.counts.get("train"):
        raise HrnetError("%s has no training records" % cfg.data)
    saved = load_saved(out_dir)
    if cfg.seed is None and saved is not None and saved.seed is not None:
        cfg = cfg.replace(seed=saved.seed)  # the input order of a resumed run is the one it started with
    cfg = cfg.resolve(info.num_classes, info.label_offset, info.counts["train"], backend.num_replicas,
                      info.counts.get("validation", 0))
    if not cfg.model.endswith((".yaml", ".yml")):
        cfg = cfg.replace(model=configs.canonical_name(cfg.model))
    if saved is not None:
        check_resumable(saved, cfg)

    set_seed(cfg.seed)
    run = _Run(cfg, backend, configs.load(cfg.model), info, out_dir, write_dir)
    latest = run.restore(data_dir)
    if run.start_step >= cfg.train_steps and os.path.exists(os.path.join(out_dir, MANIFEST)):
        log.info("%s is complete (step %d of %d); nothing to do", cfg.out, run.start_step, cfg.train_steps)
        return read_manifest(out_dir, kind="checkpoint")
    if run.chief and os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))  # more steps asked for: incomplete again
    step = run.loop()
    if step > run.start_step or latest is None:  # the same decision on every rank (saves are collective)
        run.save(step)
    if step in run.val_steps and step not in run.validated:
        run.validate(step)
    manifest = run.outputs(step)
    _barrier(backend.strategy)  # no worker leaves (and tears down the cluster) while another still saves
    if run.chief:
        _publish(out_dir, cfg.out, manifest)
    return manifest


class _Run:
    """One run's model, optimizer and checkpoints, and what its validations found, with the
    parts of a run as methods: restore, the loop, validate, save, the outputs."""

    def __init__(self, cfg: TrainConfig, backend, model_config: Dict[str, Any], info, out_dir: str,
                 write_dir: str):
        import tensorflow as tf

        from hrnet import compat
        from hrnet.model import build_model

        self.cfg, self.backend, self.info = cfg, backend, info
        self.model_config = model_config
        self.out_dir, self.write_dir = out_dir, write_dir
        self.chief = backend.is_chief
        self.schedule = cfg.lr_schedule()
        with backend.strategy.scope():
            self.model = build_model(model_config, num_classes=cfg.num_classes,
                                     input_size=(cfg.image_size, cfg.image_size))
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            # The lr is read from the step at every update (a zero-argument callable is a valid
            # learning_rate in Keras 2 and 3), so it is never stored and cannot go stale on resume.
            optimizer = compat.make_sgd(lambda: self.schedule(self.step_var), momentum=cfg.momentum,
                                        nesterov=cfg.nesterov)
            self.optimizer = backend.wrap_optimizer(optimizer)
            compat.build_optimizer(self.optimizer, self.model.trainable_variables)
        self.checkpoint = tf.train.Checkpoint(step=self.step_var, model=self.model, optimizer=self.optimizer)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory=write_dir,
                                                  max_to_keep=cfg.keep_checkpoints, checkpoint_name=CHECKPOINT_NAME)
        self.history_path = os.path.join(out_dir, HISTORY)
        self.val_steps = set(cfg.validation_steps())
        self.start_step = 0
        self.started = time.time()
        self.best: Optional[Dict[str, Any]] = None
        self.last_val: Dict[str, Any] = {}
        self.last_log: Dict[str, Any] = {}
        self.validated: set = set()
        self.writer = None
        self._predict = None
        self._folded = None

    def _validation_model(self):
        """The model validation runs: under mixed_bfloat16 a copy with BN folded into the
        convs (hrnet.model.fold_batch_norm; HRNet-W18 infers 4x faster on AMX), built at the
        first validation and folded again from the training weights at each later one, else
        the model itself (in float32 TF folds BN by itself; float16 and the NPU keep theirs).
        The copy is built outside the strategy: each rank folds its own copy of the same
        weights."""
        from hrnet import compat
        from hrnet.model import fold_batch_norm

        if self._folded is not None:
            return fold_batch_norm(self.model, self.model_config, into=self._folded)
        if compat.keras.mixed_precision.global_policy().name != "mixed_bfloat16":
            return self.model
        log.info("validating under mixed_bfloat16 with BN folded into the convs")
        self._folded = fold_batch_norm(self.model, self.model_config)
        return self._folded

    # ---- restore-or-init ------------------------------------------------------------
    def restore(self, data_dir: str) -> Optional[str]:
        """Resume from the latest checkpoint (or initialise), set every rank to the chief's
        weights, and forget what a killed run logged after its last checkpoint. Returns the
        checkpoint resumed from."""
        latest = _restore_or_init(self.checkpoint, self.out_dir, self.cfg)
        if self.chief:
            # Only now that the folder is known to hold this run (or nothing): a refused resume
            # must leave a foreign checkpoint folder exactly as it was.
            self.cfg.save(self.out_dir)
            _write_labels(self.out_dir, data_dir, self.info)
        # Read before the first collective op, so that no rank sees a line the chief writes later.
        val_history = [h for h in _read_history(self.history_path) if "val_top1" in h]
        self.backend.broadcast_variables(self.model.variables)
        self.start_step = int(self.step_var.numpy())
        val_history = [h for h in val_history if h["step"] <= self.start_step]  # not the killed run's tail
        if self.chief:
            _truncate_history(self.history_path, self.start_step)
            _truncate_events(os.path.join(self.out_dir, "logs"), self.start_step)
        self.validated = {h["step"] for h in val_history}
        self.last_val = max(val_history, key=lambda h: h["step"], default={})
        self.best = _read_best(self.out_dir, self.start_step) if self.val_steps else None
        return latest

    def _input(self):
        """The training stream from the records the steps so far consumed on: a resumed run
        sees the batches an uninterrupted one would have seen."""
        cfg, strategy = self.cfg, self.backend.strategy
        if strategy.num_replicas_in_sync > 1:
            # One input pipeline per worker, batched per replica, sharded by worker.
            return strategy.distribute_datasets_from_function(lambda ctx: _train_input(
                cfg, self.info, ctx.get_per_replica_batch_size(cfg.global_batch_size), ctx.input_pipeline_id,
                ctx.num_input_pipelines, self.start_step * (cfg.global_batch_size // ctx.num_input_pipelines)))
        return _train_input(cfg, self.info, cfg.batch_size, self.backend.worker_index, self.backend.num_workers,
                            self.start_step * cfg.batch_size)

    # ---- the loop -------------------------------------------------------------------
    def loop(self) -> int:
        """The steps from start_step to train_steps, with progress lines, checkpoints and
        validations on their schedule; returns the step reached."""
        import tensorflow as tf

        from hrnet.model import count_params

        cfg, backend = self.cfg, self.backend
        iterator = iter(self._input())
        train_loop = _make_train_loop(cfg, backend, self.model, self.optimizer, self.step_var)
        self.writer = tf.summary.create_file_writer(os.path.join(self.out_dir, "logs")) if self.chief else None
        log.info("training %s (%s params, %d classes) at %dx%d on %d images/epoch: %d steps of %d images "
                 "(%.2f epochs), lr %.4g %s, %s, %s", self.model_config["name"], f"{count_params(self.model):,}",
                 cfg.num_classes, cfg.image_size, cfg.image_size, cfg.nb_train_samples, cfg.train_steps,
                 cfg.global_batch_size, cfg.epochs, cfg.lr, cfg.schedule, cfg.precision, backend.describe())
        step = self.start_step
        window = _Window()
        self.started = time.time()
        if step in self.val_steps and step not in self.validated and step < cfg.train_steps:
            self.validate(step)  # the killed run saved this step's checkpoint but did not finish validating it
        loop_size = None
        while step < cfg.train_steps:
            n = _loop_steps(step, cfg, self.val_steps)
            if n != loop_size:
                backend.set_loop_size(n)
                loop_size = n
            t0 = time.time()
            try:
                loss_t, correct_t, bad_t, done_t = train_loop(iterator, tf.constant(n, tf.int32))
            except tf.errors.DataLossError as e:
                raise self._corrupt_data(step + 1, step + n, e) from None
            loss, done = float(loss_t), int(done_t)
            first = step == self.start_step  # its time includes tracing
            step += done
            if not math.isfinite(loss) or float(bad_t) > 0:
                self.stop(step, "the loss became %s" % (loss if not math.isfinite(loss) else "non-finite (L2 term or "
                                                                                          "gradients)"))
            window.add(loss, float(correct_t), time.time() - t0, done, timed=not first)
            if step % cfg.log_every == 0 or step == cfg.train_steps:
                self._progress(step, window)
            # A validated step is a checkpointed one: a resumed run never has to redo the steps
            # before a validation to know what it found.
            if (step % cfg.checkpoint_every == 0 or step in self.val_steps) and step < cfg.train_steps:
                self.save(step)
                if step in self.val_steps:
                    self.validate(step)
        return step

    def _corrupt_data(self, first_step: int, last_step: int, error) -> HrnetError:
        from hrnet import data

        first = error.message.splitlines()[0]
        log.error("corrupt training data (%s); looking for the record", first[:200])
        where = data.locate_corrupt_record(self.info.files["train"])
        steps = "step %d" % first_step if first_step == last_step else "steps %d-%d" % (first_step, last_step)
        return HrnetError("corrupt training data at %s: %s; convert the data set again (or fetch it again)"
                          % (steps, where or "TF reported a corrupt record (%s)" % first))

    # ---- the metrics window ---------------------------------------------------------
    def _progress(self, step: int, window: "_Window") -> None:
        """The progress line of the steps since the last one, into the log, history.jsonl and
        TensorBoard."""
        from hrnet import compat

        cfg = self.cfg
        self.last_log, per_step = window.close(step, cfg, float(self.schedule(step - 1)))
        if self.backend.loss_scaling:
            self.last_log["loss_scale"] = compat.loss_scale_value(self.optimizer)
        line = self.last_log
        log.info("step %d/%d epoch %.2f loss %.4f top1 %.4f%s lr %.5g images/s %.1f eta %s",
                 step, cfg.train_steps, line["epoch"], line["loss"], line["top1"],
                 " val-top1 %.4f" % self.last_val["val_top1"] if self.last_val else "", line["lr"],
                 line["images_per_sec"], _fmt_duration(per_step * (cfg.train_steps - step)))
        if self.chief:
            with open(self.history_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            _write_scalars(self.writer, step, line, TRAIN_SCALARS)

    def validate(self, step: int) -> None:
        """Top-1 / top-5 on the whole validation split; the best weights so far kept as BEST.
        Every rank validates on the same batches (the same collective reads of mirrored
        variables, so the same decisions); only the chief writes what it found."""
        from hrnet import data, weights
        from hrnet.evaluate import tally, top_k_predictor

        cfg = self.cfg
        count = self.info.counts["validation"]
        log.info("validating at step %d on %d images", step, count)
        model = self._validation_model()
        if self._predict is None:  # one tf.function for every validation: traced once
            self._predict = top_k_predictor(model, cfg.image_size, cfg.num_classes)
        batches = data.eval_dataset(self.info, batch_size=cfg.batch_size, image_size=cfg.image_size)
        result = tally(self._predict, batches, cfg.num_classes, count, "%s (validation)" % cfg.data, cfg.batch_size)
        self.last_val = {"step": step, "epoch": round(step / cfg.steps_per_epoch, 4), "val_top1": result.top1,
                         "val_top5": result.top5, "val_count": result.count}
        best = self.best
        improved = best is None or result.top1 > best["val_top1"]
        if improved:
            weights.save_weights(self.model, os.path.join(self.write_dir, BEST))  # every rank: collective reads
            best = self.best = dict(self.last_val, weights=BEST)
        if self.chief:
            if improved:
                storage.write_text(os.path.join(self.out_dir, BEST_INFO), json.dumps(best, indent=2) + "\n")
            with open(self.history_path, "a") as f:
                f.write(json.dumps(self.last_val) + "\n")
            _write_scalars(self.writer, step, self.last_val, VALIDATION_SCALARS)
        self.validated.add(step)
        log.info("validation at step %d (epoch %.2f): top-1 %.4f, top-5 %.4f%s", step, self.last_val["epoch"],
                 result.top1, result.top5, " (the best so far)" if improved else
                 "; the best is %.4f at step %d" % (best["val_top1"], best["step"]))

    def stop(self, step: int, what: str) -> None:
        import tensorflow as tf

        kept = tf.train.latest_checkpoint(self.out_dir)
        raise NonFiniteLossError(
            "%s at step %d (lr %.4g)%s; the run stopped, the last good checkpoint %s is kept. "
            "Lower --lr, add --warmup-epochs, or use --precision fp32"
            % (what, step, self.schedule(step - 1),
               " and dynamic loss scaling could not absorb it" if self.backend.loss_scaling else "",
               os.path.basename(kept) if kept else "(none yet)"))

    # ---- save-and-mirror ------------------------------------------------------------
    def save(self, step: int) -> None:
        from hrnet import compat

        # A finite loss does not prove finite weights (an update can overflow them): check
        # before a checkpoint can replace a good one.
        if not all(np.all(np.isfinite(compat.tf_variable(v).numpy())) for v in self.model.variables):
            self.stop(step, "the weights became NaN or Inf")
        self.manager.save(checkpoint_number=step)
        if self.chief:
            # delete: the bucket keeps the checkpoints the manager keeps, not every one ever saved.
            try:
                storage.mirror(self.out_dir, self.cfg.out, delete=True)
            except (storage.TransferError, storage.EndpointUnreachableError) as e:
                # The store is down for longer than the retries: training goes on and the next
                # save catches up; the final mirror (after the manifest) must succeed.
                log.warning("checkpoint %d not mirrored to %s yet: %s", step, self.cfg.out, e)

    # ---- outputs: portable weights, then (by _publish) the manifest, last --------------
    def outputs(self, step: int) -> Dict[str, Any]:
        """Write the portable weights; returns the manifest that describes the run."""
        import tensorflow as tf

        from hrnet import compat, weights
        from hrnet.model import count_params

        cfg = self.cfg
        weights.save_weights(self.model, os.path.join(self.write_dir, WEIGHTS))
        return {
            "kind": "checkpoint",
            "model": self.model_config["name"],
            # The model's config itself, so that evaluate / export rebuild it anywhere (also
            # when it came from a YAML file that only the training machine has).
            "model_config": self.model_config,
            "num_classes": cfg.num_classes,
            "label_offset": cfg.label_offset,
            "image_size": cfg.image_size,
            "step": step,
            "train_steps": cfg.train_steps,
            "epochs": cfg.epochs,
            "optimizer_iterations": int(compat.tf_variable(self.optimizer.iterations).numpy()),
            "precision": cfg.precision,
            "device": cfg.device,
            "num_replicas": self.backend.num_replicas,
            "global_batch_size": cfg.global_batch_size,
            "params": count_params(self.model),
            "weights": WEIGHTS,
            "checkpoint": os.path.basename(self.manager.latest_checkpoint),
            "final": self.last_log,
            # The weights with the best validation top-1 (evaluate / export use them by default).
            "best": self.best,
            "validation": self.last_val or None,
            "seconds": round(time.time() - self.started, 1),
            "tensorflow": tf.__version__,
            "keras": ".".join(str(v) for v in compat.KERAS_VERSION),
            "out": cfg.out,
        }


def _restore_or_init(checkpoint, out_dir: str, cfg: TrainConfig) -> Optional[str]:
    """Resume from the latest checkpoint in ``out_dir``; without one, start from
    ``cfg.init_from`` (or from scratch). Returns the checkpoint resumed from."""
    import tensorflow as tf

    from hrnet import compat

    latest = tf.train.latest_checkpoint(out_dir)
    if latest:
        status = checkpoint.restore(latest)
        try:
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError) as e:
            status.expect_partial()  # no flood of "unrestored value" warnings on the way out
            raise HrnetError(
                "cannot resume from %s: it does not match this run's model and optimizer (%s). Was it written "
                "under another Keras version (this is Keras %s) or with another --model/--precision? Use a new "
                "--out; a finished run's portable weights can seed it with --init-from"
                % (latest, str(e).splitlines()[0][:120], ".".join(str(v) for v in compat.KERAS_VERSION))) from None
        log.info("resuming from %s (step %d)", os.path.basename(latest), int(checkpoint.step.numpy()))
    elif cfg.init_from:
        _init_from(checkpoint.model, cfg.init_from, cfg.num_classes)
    return latest


def _loop_steps(step: int, cfg: TrainConfig, val_steps) -> int:
    """Steps for the next call of the training loop: steps_per_loop, cut short where the
    host has work (a log line, a checkpoint, a validation, the end)."""
    due = [cfg.train_steps, (step // cfg.log_every + 1) * cfg.log_every,
           (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every]
    due += [s for s in val_steps if s > step]
    return max(1, min(cfg.steps_per_loop, min(due) - step))


def _make_train_loop(cfg: TrainConfig, backend, model, optimizer, step_var):
    """The compiled loop: ``n`` steps in one call (a while loop in the graph; on the npu, the
    adapter's sunk loop). One step: a batch per replica, the gradients all-reduced, the step
    counted. Returns the data loss and correct predictions summed over the steps run, a
    non-finite flag and the steps run: a non-finite step ends the loop early (except on the
    npu, whose sunk loop runs its whole length), so it is caught at the step it happened."""
    import tensorflow as tf

    from hrnet import compat

    strategy = backend.strategy
    loss_batch = cfg.batch_size * strategy.num_replicas_in_sync
    trainable = model.trainable_variables
    num_classes = cfg.num_classes
    smoothing = cfg.label_smoothing

    def step_fn(images, labels):
        labels = tf.cast(labels, tf.int32)
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            targets = tf.one_hot(labels, num_classes)
            if smoothing:
                targets = targets * (1.0 - smoothing) + smoothing / num_classes
            per_example = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            data_loss = tf.reduce_sum(per_example) / loss_batch
            l2 = tf.add_n([tf.nn.l2_loss(tf.cast(compat.tf_variable(v), tf.float32)) for v in trainable])
            loss = data_loss + cfg.weight_decay * l2 / strategy.num_replicas_in_sync
            scaled = compat.scale_loss(optimizer, loss) if backend.loss_scaling else loss
        grads = tape.gradient(scaled, trainable)
        if backend.loss_scaling:
            grads = compat.unscale_gradients(optimizer, grads)
        grads = backend.all_reduce_gradients(grads)
        if backend.loss_scaling:
            bad = tf.constant(0.0)  # the loss-scale optimizer skips steps with non-finite gradients
        else:
            bad = 1.0 - tf.cast(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]), tf.float32)
        optimizer.apply_gradients(zip(grads, trainable))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                                        tf.float32))
        # Non-finite total loss (data + L2) or gradients: BatchNorm keeps the data loss finite
        # while exploding weights overflow the L2 term and the momentum.
        bad = tf.maximum(bad, 1.0 - tf.cast(tf.math.is_finite(loss), tf.float32))
        return data_loss, correct, bad

    def one_step(it):
        images, labels = next(it)
        results = strategy.run(step_fn, args=(images, labels))
        step_var.assign_add(1)
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

    @tf.function
    def train_loop(it, n):
        def more(done, loss, correct, bad):
            return done < n if backend.sinks_loops else tf.logical_and(done < n, bad == 0.0)

        def body(done, loss, correct, bad):
            step_loss, step_correct, step_bad = one_step(it)
            return done + 1, loss + step_loss, correct + step_correct, tf.maximum(bad, step_bad)

        zero = tf.constant(0.0)
        done, loss, correct, bad = tf.while_loop(more, body, (tf.constant(0), zero, zero, zero))
        return loss, correct, bad, done

    return train_loop


class _Window:
    """Loss, top-1 and speed over the steps since the last progress line."""

    def __init__(self):
        self._begin()

    def _begin(self) -> None:
        self.loss = self.correct = self.timed_seconds = 0.0
        self.steps = self.timed_steps = 0
        self.start = time.time()

    def add(self, loss: float, correct: float, seconds: float, steps: int, timed: bool) -> None:
        """Sums over ``steps`` steps that took ``seconds``."""
        self.loss += loss
        self.correct += correct
        self.steps += steps
        if timed:
            self.timed_steps += steps
            self.timed_seconds += seconds

    def close(self, step: int, cfg: TrainConfig, lr: float):
        """This window's history line and seconds per step; then a new window begins."""
        elapsed = time.time() - self.start
        per_step = self.timed_seconds / self.timed_steps if self.timed_steps else elapsed / max(1, self.steps)
        line = {
            "step": step,
            "epoch": round(step / cfg.steps_per_epoch, 4),
            "loss": self.loss / self.steps,
            "top1": self.correct / (self.steps * cfg.global_batch_size),
            "lr": lr,
            "images_per_sec": cfg.global_batch_size / per_step if per_step > 0 else 0.0,
        }
        self._begin()
        return line, per_step


def _publish(out_dir: str, uri: str, manifest: Dict[str, Any]) -> None:
    """The manifest last (listing the portable weights and what describes the run), then the
    folder to ``uri``: a reader that finds the manifest finds everything it lists."""
    from hrnet.manifest import file_entry, write_manifest

    manifest["files"] = [file_entry(os.path.join(out_dir, f), out_dir) for f in sorted(os.listdir(out_dir))
                         if f.startswith((WEIGHTS + ".", BEST + ".")) or f in (LABELS, CONFIG_FILE, BEST_INFO)]
    write_manifest(out_dir, manifest)
    storage.mirror(out_dir, uri)
    log.info("done: step %d, checkpoint %s, weights %s", manifest["step"], manifest["checkpoint"],
             os.path.join(uri, WEIGHTS))


def _barrier(strategy) -> None:
    """Wait for every worker (a one-number all-reduce); a no-op with one replica."""
    if strategy.num_replicas_in_sync > 1:
        import tensorflow as tf

        @tf.function  # collectives run eagerly are slow, and TF says so
        def all_reduce_one():
            return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.ones([])), axis=None)

        all_reduce_one().numpy()


TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar")


def _init_from(model, source: str, num_classes: int) -> None:
    """Start from other weights: ``hrnet import-weights`` output, a checkpoint folder, or an
    official / timm PyTorch checkpoint (imported on the fly), each a local path or an s3:// /
    minio:// URI; a classifier of another class count is left freshly initialised."""
    from hrnet import weights

    if source.endswith(TORCH_SUFFIXES):
        with tempfile.TemporaryDirectory(prefix="hrnet-init-") as tmp:
            path = source
            if storage.is_remote(source):
                path = os.path.join(tmp, os.path.basename(source))
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(source))  # verified against the object's sha256
            values = weights.torch_to_keras(weights.torch_state_dict(path), model)
        prefix = source
    else:
        prefix = storage.local_input(source) if storage.is_remote(source) else source
        if os.path.isdir(prefix):
            prefix = os.path.join(prefix, WEIGHTS)
        values = weights.read_weights(prefix)
    kernel = values.get(weights.CLASSIFIER + "/kernel")
    skip = kernel is not None and int(kernel.shape[-1]) != num_classes
    if skip:
        values = {k: v for k, v in values.items() if not k.startswith(weights.CLASSIFIER + "/")}
    n = weights.assign_weights(model, values, skip_classifier=skip, source=prefix)
    log.info("initialised %d tensors from %s%s", n, prefix,
             " (classifier re-initialised for %d classes)" % num_classes if skip else "")


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    _config_arguments(parser)
    storage.add_force_argument(parser)


def run(args) -> int:
    manifest = train(from_args(args), force=args.force)
    final = manifest.get("final") or {}
    print("trained %s to step %d: loss %.4f, train top-1 %.4f; checkpoint in %s" % (
        manifest.get("model"), manifest.get("step", 0), final.get("loss", float("nan")),
        final.get("top1", float("nan")), manifest.get("out", "")))
    return 0

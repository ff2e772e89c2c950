"""One training run: the model, optimizer and checkpoints (``Run``), the loop over the
compiled steps (hrnet.train.step) with progress lines, checkpoints and validations on their
schedule, and the run folder's outputs. hrnet.train.loop sets the devices up and holds the
output's lease first; this module imports TensorFlow, that one does not.
"""
import json
import logging
import math
import os
import random
import time
from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

from hrnet import compat, configs, data, run_folder, storage, weights
from hrnet.data import reference, stream
from hrnet.errors import HrnetError
from hrnet.evaluate import tally, top_k_predictor
from hrnet.manifest import MANIFEST, read_manifest
from hrnet.model import build_model, count_params, fold_batch_norm
from hrnet.runtime import LOCAL_PROCESSES_ENV
from hrnet.train.config import TrainConfig, check_resumable, load_saved
from hrnet.train.start import restore_or_init
from hrnet.train.step import Window, barrier, loop_steps, make_train_loop

# The progress lines keep the command's logger name, which users and the demo's log read.
log = logging.getLogger("hrnet.train.loop")


class NonFiniteLossError(HrnetError):
    """The loss became NaN or Inf and loss scaling could not absorb it."""


# ----------------------------------------------------------------------------- data seam

def _splits(cfg: TrainConfig):
    """The splits a run reads: validation too unless it was switched off."""
    return ("train",) if cfg.eval_every == 0 else ("train", "validation")


def _data_info(cfg: TrainConfig, data_dir: str, remote: str = ""):
    """hrnet.data.DatasetInfo: classes, label offset, counts and files per split."""

    return data.dataset_info(data_dir, num_classes=cfg.num_classes, label_offset=cfg.label_offset,
                             verify=cfg.verify_data and not remote, splits=_splits(cfg), remote=remote)


def data_cache(cfg: TrainConfig, split: str) -> int:
    """Bytes of disk this process may give streamed shards of ``split``: data_cache_gb is per
    server, shared by its processes (``hrnet launch`` says how many); with validation on,
    a quarter of it holds the validation shards while a validation reads them."""
    share = cfg.data_cache_gb * stream.GB / int(os.environ.get(LOCAL_PROCESSES_ENV, "1"))
    if not cfg.eval_every:
        return int(share)
    return int(share / 4) if split == "validation" else int(share - share / 4)


def _train_input(cfg: TrainConfig, info, batch_size: int, worker_index: int, num_workers: int,
                 start_record: int = 0):
    """This worker's share of the training stream, batched per device (hrnet.data), from
    ``start_record`` on (what the steps before a resume consumed)."""

    return data.train_dataset(
        info, batch_size=batch_size, image_size=cfg.image_size, worker_index=worker_index,
        num_workers=num_workers, label_offset=cfg.label_offset, num_classes=cfg.num_classes,
        augment=cfg.augment(), seed=cfg.seed,
        start_record=start_record, data_cache=data_cache(cfg, "train"),
    )


# ----------------------------------------------------------------------------- helpers

def set_seed(seed: Optional[int]) -> None:
    """Seed Python, numpy and TF (Keras 3 initializers draw from Python's random)."""
    if seed is None:
        return

    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return "%d:%02d:%02d" % (seconds // 3600, seconds % 3600 // 60, seconds % 60)


def run_training(cfg: TrainConfig, backend, out_dir: str, write_dir: str) -> Dict[str, Any]:
    """The run itself. out_dir: the local checkpoint folder (rank 0 writes it, every rank
    resumes from it); write_dir: where this rank's checkpoints go (out_dir on rank 0)."""

    data_dir, remote = reference.stage_or_stream(cfg.data, _splits(cfg), verify=backend.is_chief,
                                                 stream=cfg.data_cache_gb > 0)
    info = _data_info(cfg, data_dir, remote)
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
    run = Run(cfg, backend, configs.load(cfg.model), info, out_dir, write_dir)
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
    barrier(backend.strategy)  # no worker leaves (and tears down the cluster) while another still saves
    if run.chief:
        run_folder.publish(out_dir, cfg.out, manifest)
    return manifest


class Run:
    """One run's model, optimizer and checkpoints, and what its validations found, with the
    parts of a run as methods: restore, the loop, validate, save, the outputs."""

    def __init__(self, cfg: TrainConfig, backend, model_config: Dict[str, Any], info, out_dir: str,
                 write_dir: str):


        self.cfg, self.backend, self.info = cfg, backend, info
        self._waited = 0.0  # stream.waited() at the last progress line
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
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory=write_dir, max_to_keep=cfg.keep_checkpoints,
            checkpoint_name=run_folder.CHECKPOINT_NAME)
        self.history_path = os.path.join(out_dir, run_folder.HISTORY)
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
        latest = restore_or_init(self.checkpoint, self.out_dir, self.cfg)
        if self.chief:
            # Only now that the folder is known to hold this run (or nothing): a refused resume
            # must leave a foreign checkpoint folder exactly as it was.
            self.cfg.save(self.out_dir)
            run_folder.write_labels(self.out_dir, data_dir, self.info)
        # Read before the first collective op, so that no rank sees a line the chief writes later.
        val_history = [h for h in run_folder.read_history(self.history_path) if "val_top1" in h]
        self.backend.broadcast_variables(self.model.variables)
        self.start_step = int(self.step_var.numpy())
        val_history = [h for h in val_history if h["step"] <= self.start_step]  # not the killed run's tail
        if self.chief:
            run_folder.truncate_history(self.history_path, self.start_step)
            run_folder.truncate_events(os.path.join(self.out_dir, run_folder.LOGS), self.start_step)
        self.validated = {h["step"] for h in val_history}
        self.last_val = max(val_history, key=lambda h: h["step"], default={})
        self.best = run_folder.read_best(self.out_dir, self.start_step) if self.val_steps else None
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


        cfg, backend = self.cfg, self.backend
        iterator = iter(self._input())
        train_loop = make_train_loop(cfg, backend, self.model, self.optimizer, self.step_var)
        self.writer = tf.summary.create_file_writer(os.path.join(self.out_dir, run_folder.LOGS)) if self.chief else None
        log.info("training %s (%s params, %d classes) at %dx%d on %d images/epoch: %d steps of %d images "
                 "(%.2f epochs), lr %.4g %s, %s, %s", self.model_config["name"], f"{count_params(self.model):,}",
                 cfg.num_classes, cfg.image_size, cfg.image_size, cfg.nb_train_samples, cfg.train_steps,
                 cfg.global_batch_size, cfg.epochs, cfg.lr, cfg.schedule, cfg.precision, backend.describe())
        step = self.start_step
        window = Window()
        self.started = time.time()
        if step in self.val_steps and step not in self.validated and step < cfg.train_steps:
            self.validate(step)  # the killed run saved this step's checkpoint but did not finish validating it
        loop_size = None
        while step < cfg.train_steps:
            n = loop_steps(step, cfg, self.val_steps)
            if n != loop_size:
                backend.set_loop_size(n)
                loop_size = n
            t0 = time.time()
            try:
                loss_t, correct_t, bad_t, done_t = train_loop(iterator, tf.constant(n, tf.int32))
            except tf.errors.DataLossError as e:
                raise self._corrupt_data(step + 1, step + n, e) from None
            except tf.errors.OpError:
                stream.raise_failure()  # the shard that could not be fetched, named
                raise
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

        first = error.message.splitlines()[0]
        log.error("corrupt training data (%s); looking for the record", first[:200])
        where = data.locate_corrupt_record(self.info.files["train"])
        steps = "step %d" % first_step if first_step == last_step else "steps %d-%d" % (first_step, last_step)
        return HrnetError("corrupt training data at %s: %s; convert the data set again (or fetch it again)"
                          % (steps, where or "TF reported a corrupt record (%s)" % first))

    # ---- the metrics window ---------------------------------------------------------
    def _progress(self, step: int, window: Window) -> None:
        """The progress line of the steps since the last one, into the log, history.jsonl and
        TensorBoard."""

        cfg = self.cfg
        self.last_log, per_step = window.close(step, cfg, float(self.schedule(step - 1)))
        if self.backend.loss_scaling:
            self.last_log["loss_scale"] = compat.loss_scale_value(self.optimizer)
        line = self.last_log
        # Time the input spent waiting for streamed shards: a storage bottleneck, not compute.
        waited, self._waited = stream.waited() - self._waited, stream.waited()
        if self.info.remote:
            line["data_wait_s"] = round(waited, 3)
        log.info("step %d/%d epoch %.2f loss %.4f top1 %.4f%s lr %.5g images/s %.1f%s eta %s",
                 step, cfg.train_steps, line["epoch"], line["loss"], line["top1"],
                 " val-top1 %.4f" % self.last_val["val_top1"] if self.last_val else "", line["lr"],
                 line["images_per_sec"], " (waited %.1fs for data)" % waited if waited >= 0.1 else "",
                 _fmt_duration(per_step * (cfg.train_steps - step)))
        if self.chief:
            with open(self.history_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            run_folder.write_scalars(self.writer, step, line, run_folder.TRAIN_SCALARS)

    def validate(self, step: int) -> None:
        """Top-1 / top-5 on the whole validation split; the best weights so far kept as BEST.
        Every rank validates on the same batches (the same collective reads of mirrored
        variables, so the same decisions); only the chief writes what it found."""

        cfg = self.cfg
        count = self.info.counts["validation"]
        log.info("validating at step %d on %d images", step, count)
        model = self._validation_model()
        if self._predict is None:  # one tf.function for every validation: traced once
            self._predict = top_k_predictor(model, cfg.image_size, cfg.num_classes)
        batches = data.eval_dataset(self.info, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    data_cache=data_cache(cfg, "validation"))
        result = tally(self._predict, batches, cfg.num_classes, count, "%s (validation)" % cfg.data, cfg.batch_size)
        self.last_val = {"step": step, "epoch": round(step / cfg.steps_per_epoch, 4), "val_top1": result.top1,
                         "val_top5": result.top5, "val_count": result.count}
        best = self.best
        improved = best is None or result.top1 > best["val_top1"]
        if improved:
            # Every rank: reading mirrored variables is collective.
            weights.save_weights(self.model, os.path.join(self.write_dir, run_folder.BEST))
            best = self.best = dict(self.last_val, weights=run_folder.BEST)
        if self.chief:
            if improved:
                storage.write_text(os.path.join(self.out_dir, run_folder.BEST_INFO), json.dumps(best, indent=2) + "\n")
            with open(self.history_path, "a") as f:
                f.write(json.dumps(self.last_val) + "\n")
            run_folder.write_scalars(self.writer, step, self.last_val, run_folder.VALIDATION_SCALARS)
        self.validated.add(step)
        log.info("validation at step %d (epoch %.2f): top-1 %.4f, top-5 %.4f%s", step, self.last_val["epoch"],
                 result.top1, result.top5, " (the best so far)" if improved else
                 "; the best is %.4f at step %d" % (best["val_top1"], best["step"]))

    def stop(self, step: int, what: str) -> None:

        kept = tf.train.latest_checkpoint(self.out_dir)
        raise NonFiniteLossError(
            "%s at step %d (lr %.4g)%s; the run stopped, the last good checkpoint %s is kept. "
            "Lower --lr, add --warmup-epochs, or use --precision fp32"
            % (what, step, self.schedule(step - 1),
               " and dynamic loss scaling could not absorb it" if self.backend.loss_scaling else "",
               os.path.basename(kept) if kept else "(none yet)"))

    # ---- save-and-mirror ------------------------------------------------------------
    def save(self, step: int) -> None:

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

    # ---- outputs: portable weights, then (by run_folder.publish) the manifest, last --------------
    def outputs(self, step: int) -> Dict[str, Any]:
        """Write the portable weights; returns the manifest that describes the run."""
        cfg = self.cfg
        weights.save_weights(self.model, os.path.join(self.write_dir, run_folder.WEIGHTS))
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
            "weights": run_folder.WEIGHTS,
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

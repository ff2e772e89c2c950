"""The run folder: what ``hrnet train`` writes and evaluate, export and the report read.

    train_config.yaml   the resolved TrainConfig (hrnet.train.config)
    labels.txt          the data set's classes
    ckpt-<step>.*       tf.train.CheckpointManager: step, model, optimizer slots
    weights.*           portable weights (hrnet.weights); best.* and best.json: the best by validation
    history.jsonl       one line per progress line and per validation
    logs/               TensorBoard scalars
    manifest.json       last: a folder without it is an unfinished run

The same folder is a checkpoint (``kind: checkpoint``); ``hrnet import-weights`` writes
the other kind of model folder (``kind: weights``), which holds only portable weights.
"""
import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

from hrnet import storage
from hrnet.errors import HrnetError, with_article
from hrnet.fileio import atomic_write, replacing

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.yaml"
LOGS = "logs"
HISTORY = "history.jsonl"
LABELS = "labels.txt"
WEIGHTS = "weights"
# The weights with the best validation top-1 so far (a weights prefix, like WEIGHTS) and
# what validation found for them; written in this order, so a crash between the two is
# healed by the validation a resumed run repeats.
BEST = "best"
BEST_INFO = "best.json"
CHECKPOINT_NAME = "ckpt"


def truncate_history(path: str, step: int) -> None:
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


def truncate_events(logs_dir: str, step: int) -> None:
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


def write_labels(out_dir: str, data_dir: str, info) -> None:
    """labels.txt of the data set; for slim-made records without one, from the class names."""
    src = os.path.join(data_dir, LABELS)
    dst = os.path.join(out_dir, LABELS)
    if os.path.exists(src):
        shutil.copyfile(src, dst)
        return
    with open(dst, "w") as f:
        for i, (name, text) in enumerate(zip(info.class_names, info.class_texts)):
            f.write("%d\t%s\t%s\n" % (i + info.label_offset, name, text))


# TensorBoard tag -> history.jsonl key.
TRAIN_SCALARS = {"train/" + k: k for k in ("loss", "top1", "lr", "images_per_sec", "loss_scale", "data_wait_s")}
VALIDATION_SCALARS = {"validation/top1": "val_top1", "validation/top5": "val_top5"}


def write_scalars(writer, step: int, values: Dict[str, Any], tags: Dict[str, str]) -> None:
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


def read_history(path: str):
    """history.jsonl's lines (none where it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def read_best(directory: str, start_step: int) -> Optional[Dict[str, Any]]:
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


def publish(out_dir: str, uri: str, manifest: Dict[str, Any]) -> None:
    """The manifest last (listing the portable weights and what describes the run), then the
    folder to ``uri``: a reader that finds the manifest finds everything it lists."""
    from hrnet.manifest import file_entry, write_manifest

    manifest["files"] = [file_entry(os.path.join(out_dir, f), out_dir) for f in sorted(os.listdir(out_dir))
                         if f.startswith((WEIGHTS + ".", BEST + ".")) or f in (LABELS, CONFIG_FILE, BEST_INFO)]
    write_manifest(out_dir, manifest)
    storage.mirror(out_dir, uri)
    log.info("done: step %d, checkpoint %s, weights %s", manifest["step"], manifest["checkpoint"],
             os.path.join(uri, WEIGHTS))


# What can be evaluated and exported: a finished training run, or the weights `hrnet
# import-weights` wrote (official / timm ImageNet models: their image size is 224).
MODEL_KINDS = ("checkpoint", "weights")
IMPORTED_IMAGE_SIZE = 224


def read_model_manifest(checkpoint_dir: str) -> Dict[str, Any]:
    """The manifest of a checkpoint folder or an imported weights folder."""
    from hrnet.manifest import read_manifest

    manifest = read_manifest(checkpoint_dir)
    if manifest.get("kind") not in MODEL_KINDS:
        raise HrnetError("%s holds %s output, not a model (the output of `hrnet train` or `hrnet import-weights`)"
                         % (checkpoint_dir, with_article(str(manifest.get("kind") or "unknown"))))
    if manifest["kind"] == "weights":
        manifest = dict(manifest, image_size=manifest.get("image_size", IMPORTED_IMAGE_SIZE))
    return manifest


WEIGHT_CHOICES = ("best", "last")


def pick_weights(manifest: Dict[str, Any], which: str = "best") -> Dict[str, Any]:
    """Which weights of a model folder to use: ``best`` (by validation top-1, when the run
    validated; else the last, said in the log) or ``last``. Returns {"which", "weights"
    (file prefix), "step"}."""
    if which not in WEIGHT_CHOICES:
        raise HrnetError("weights must be one of %s, got %r" % (", ".join(WEIGHT_CHOICES), which))
    best = manifest.get("best")
    if which == "best" and best:
        return {"which": "best", "weights": best["weights"], "step": best["step"]}
    if which == "best" and manifest.get("kind") == "checkpoint":
        log.info("the run kept no best weights (it trained without validation): using its last weights")
    return {"which": "last", "weights": manifest.get("weights", WEIGHTS), "step": manifest.get("step")}


def load_checkpoint_model(checkpoint_dir: str, image_size: Optional[int] = None, which: str = "best"):
    """(model, manifest, picked) from a finished checkpoint folder or imported weights (a
    local path); ``picked``: the weights loaded (pick_weights)."""
    from hrnet import weights
    from hrnet.model import build_model

    manifest = read_model_manifest(checkpoint_dir)
    picked = pick_weights(manifest, which)
    size = image_size or manifest["image_size"]
    model = build_model(manifest.get("model_config") or manifest["model"], num_classes=manifest["num_classes"],
                        input_size=(size, size))
    weights.load_weights(model, os.path.join(checkpoint_dir, picked["weights"]))
    return model, manifest, picked

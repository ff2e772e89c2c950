"""``hrnet evaluate``: top-1, top-5 and per-class accuracy of a checkpoint on the validation split.

    hrnet evaluate --data DIR --checkpoint DIR [--out DIR] [--batch-size 100]

Every validation record is seen exactly once (hrnet.data.eval_dataset: no shuffle, no
repeat, the last batch partial), and the count is checked against the data set's own
count. The model is rebuilt from the checkpoint's manifest and loads its portable
weights, so a checkpoint trained under Keras 2 is evaluated under Keras 3 and back.
Outputs in ``out``: metrics.json (top1, top5, count, per_class) and manifest.json, last.
"""
import json
import logging
import os
import time
from typing import Any, Dict, Optional

from hrnet import storage
from hrnet.data.reference import stage
from hrnet.errors import HrnetError

log = logging.getLogger(__name__)

METRICS = "metrics.json"


# What can be evaluated and exported: a finished training run, or the weights `hrnet
# import-weights` wrote (official / timm ImageNet models: their image size is 224).
MODEL_KINDS = ("checkpoint", "weights")
IMPORTED_IMAGE_SIZE = 224


def read_model_manifest(checkpoint_dir: str) -> Dict[str, Any]:
    """The manifest of a checkpoint folder or an imported weights folder."""
    from hrnet.manifest import read_manifest

    manifest = read_manifest(checkpoint_dir)
    if manifest.get("kind") not in MODEL_KINDS:
        raise HrnetError("%s holds a %r output, not a model (the output of `hrnet train` or `hrnet import-weights`)"
                         % (checkpoint_dir, manifest.get("kind")))
    if manifest["kind"] == "weights":
        manifest = dict(manifest, image_size=manifest.get("image_size", IMPORTED_IMAGE_SIZE))
    return manifest


def load_checkpoint_model(checkpoint_dir: str, image_size: Optional[int] = None):
    """(model, manifest) from a finished checkpoint folder or imported weights (local path)."""
    from hrnet import weights
    from hrnet.model import build_model

    manifest = read_model_manifest(checkpoint_dir)
    size = image_size or manifest["image_size"]
    model = build_model(manifest.get("model_config") or manifest["model"], num_classes=manifest["num_classes"],
                        input_size=(size, size))
    weights.load_weights(model, os.path.join(checkpoint_dir, manifest.get("weights", "weights")))
    return model, manifest


def _dataset_info(hdata, data_dir: str, ckpt: Dict[str, Any], split: str, num_classes: Optional[int],
                  label_offset: Optional[int]):
    """The data set's own description, for ``split`` only. Records without a manifest
    (slim's) are read with the given class count and label offset, else the checkpoint's;
    a manifest's own values win, and one that disagrees with a given value is an error."""
    from hrnet.manifest import MANIFEST

    if os.path.exists(os.path.join(data_dir, MANIFEST)):
        return hdata.dataset_info(data_dir, num_classes=num_classes, label_offset=label_offset, splits=(split,))
    if label_offset is None:
        label_offset = ckpt.get("label_offset")
    if label_offset is None:
        raise HrnetError("%s has no manifest.json (records made by slim's script?): give --label-offset (slim's "
                         "ImageNet: 1)" % data_dir)
    return hdata.dataset_info(data_dir, num_classes=num_classes or ckpt["num_classes"], label_offset=label_offset,
                              splits=(split,))


def evaluate(data: str, checkpoint: str, out: Optional[str] = None, batch_size: int = 100,
             split: str = "validation", image_size: Optional[int] = None, force: bool = False,
             num_classes: Optional[int] = None, label_offset: Optional[int] = None,
             crop_ratio: float = 0.875) -> Dict[str, Any]:
    """Evaluate the model at ``checkpoint`` (a training run's checkpoint folder, or the
    weights ``hrnet import-weights`` wrote) on ``split`` of the data set at ``data``, with
    the official protocol (shorter side to size / ``crop_ratio``, center crop); returns the
    metrics (also written to ``out`` when given). ``num_classes`` / ``label_offset``: for
    records without a manifest (slim's ImageNet: 1000 and 1)."""
    import numpy as np
    import tensorflow as tf

    from hrnet import data as hdata
    from hrnet.compat import set_mixed_precision
    from hrnet.manifest import write_manifest

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1, got %r" % batch_size)
    set_mixed_precision("float32")  # evaluation is in float32 whatever the training precision was
    ckpt_dir = storage.local_input(checkpoint)
    ckpt = read_model_manifest(ckpt_dir)
    if out:
        storage.claim_output(out, "evaluation", mark=False)  # a wrong --out fails now, not after the work
    # Only the split evaluated is fetched (a remote ImageNet: 6 of its 150 GB).
    info = _dataset_info(hdata, stage(data, (split,)), ckpt, split, num_classes, label_offset)
    if info.num_classes != ckpt["num_classes"]:
        raise HrnetError("the checkpoint %s was trained on %d classes, but the data set %s has %d"
                         % (checkpoint, ckpt["num_classes"], data, info.num_classes))
    model, ckpt = load_checkpoint_model(ckpt_dir, image_size)
    size = image_size or ckpt["image_size"]
    expected = info.counts.get(split, 0)
    if not expected:
        raise HrnetError("%s has no %s records to evaluate on" % (data, split))
    num_classes = ckpt["num_classes"]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def predict(images):
        logits = model(images, training=False)
        return tf.math.top_k(logits, k=min(5, num_classes)).indices

    dataset = hdata.eval_dataset(info, batch_size=batch_size, image_size=size, split=split, crop_ratio=crop_ratio)
    total_batches = -(-expected // batch_size)
    count, top1, top5 = 0, 0, 0
    per_class_count = np.zeros(num_classes, np.int64)
    per_class_correct = np.zeros(num_classes, np.int64)
    start = time.time()
    for i, (images, labels) in enumerate(dataset):
        top = predict(images).numpy()
        labels = labels.numpy()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise HrnetError("%s holds label %d, outside the checkpoint's %d classes"
                             % (data, int(labels.max() if labels.max() >= num_classes else labels.min()), num_classes))
        hit1 = top[:, 0] == labels
        top1 += int(hit1.sum())
        top5 += int((top == labels[:, None]).any(axis=1).sum())
        count += len(labels)
        np.add.at(per_class_count, labels, 1)
        np.add.at(per_class_correct, labels, hit1.astype(np.int64))
        if (i + 1) % 50 == 0 or i + 1 == total_batches:
            log.info("evaluated %d/%d images (%d/%d batches), top-1 so far %.4f", count, expected, i + 1,
                     total_batches, top1 / count)
    if count != expected:
        raise HrnetError("evaluated %d %s records, but the data set says it holds %d" % (count, split, expected))
    names = list(info.class_names)
    texts = list(getattr(info, "class_texts", names))
    metrics = {
        "top1": top1 / count,
        "top5": top5 / count,
        "count": count,
        "split": split,
        "per_class": {
            str(c): {"name": names[c] if c < len(names) else str(c), "text": texts[c] if c < len(texts) else "",
                     "count": int(per_class_count[c]), "correct": int(per_class_correct[c]),
                     "top1": float(per_class_correct[c] / per_class_count[c]) if per_class_count[c] else 0.0}
            for c in range(num_classes)
        },
        "model": ckpt["model"],
        "step": ckpt.get("step"),
        "image_size": size,
        "seconds": round(time.time() - start, 1),
    }
    log.info("%s on %d %s images: top-1 %.4f, top-5 %.4f", ckpt["model"], count, split, metrics["top1"],
             metrics["top5"])
    if out:
        with storage.local_output(out, kind="evaluation", force=force) as out_dir:
            path = os.path.join(out_dir, METRICS)
            with open(path, "w") as f:
                json.dump(metrics, f, indent=2)
                f.write("\n")
            from hrnet.manifest import file_entry

            write_manifest(out_dir, {
                "kind": "evaluation", "data": data, "checkpoint": checkpoint, "model": ckpt["model"],
                "step": ckpt.get("step"), "split": split, "count": count, "top1": metrics["top1"],
                "top5": metrics["top5"], "files": [file_entry(path, out_dir)],
            })
    return metrics


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="data set folder or URI (output of `hrnet convert`)")
    parser.add_argument("--checkpoint", "--weights", dest="checkpoint", required=True,
                        help="checkpoint folder or URI (output of `hrnet train`), or imported weights (output of "
                             "`hrnet import-weights`)")
    parser.add_argument("--out", default=None, help="folder or URI for metrics.json and manifest.json")
    parser.add_argument("--batch-size", type=int, default=100, help="images per batch (default 100)")
    parser.add_argument("--split", default="validation", help="split to evaluate (default validation)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="evaluation crop size (default: the training size; 224 for imported weights)")
    parser.add_argument("--crop-ratio", type=float, default=0.875,
                        help="center crop / resized shorter side (default 0.875: 224 of 256)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="records without a manifest.json: their class count (default: the model's)")
    parser.add_argument("--label-offset", type=int, default=None, choices=(0, 1),
                        help="records without a manifest.json: the label of class 0 (slim's ImageNet: 1; default: "
                             "the checkpoint's)")
    storage.add_force_argument(parser)


def run(args) -> int:
    m = evaluate(args.data, args.checkpoint, out=args.out, batch_size=args.batch_size, split=args.split,
                 image_size=args.image_size, force=args.force, num_classes=args.num_classes,
                 label_offset=args.label_offset, crop_ratio=args.crop_ratio)
    print("%s: top-1 %.2f%%, top-5 %.2f%% on %d %s images" % (m["model"], 100 * m["top1"], 100 * m["top5"],
                                                               m["count"], m["split"]))
    return 0

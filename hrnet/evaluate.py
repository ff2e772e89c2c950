"""``hrnet evaluate``: top-1, top-5 and per-class accuracy of a checkpoint on the validation split.

    hrnet evaluate --data DIR --checkpoint DIR [--out DIR] [--batch-size 100]

Every validation record is seen exactly once (hrnet.data.eval_dataset: no shuffle, no
repeat, the last batch partial), and the count is checked against the data set's own
count. The model is rebuilt from the checkpoint's manifest and loads its portable
weights, so a checkpoint trained under Keras 2 is evaluated under Keras 3 and back.
Outputs in ``out``: metrics.json (top1, top5, count, per_class, the confusion matrix, the
most-confused pairs and the most confident mistakes), the mistakes' thumbnails
(mistake-NN.png) and manifest.json, last.
"""
import heapq
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

from hrnet import storage
from hrnet.data.reference import stage_or_stream
from hrnet.data.stream import DATA_CACHE_GB, GB
from hrnet.errors import HrnetError
from hrnet.run_folder import WEIGHT_CHOICES, load_checkpoint_model, read_model_manifest

log = logging.getLogger(__name__)

METRICS = "metrics.json"


class Tally:
    """What one pass over a split found: the confusion matrix (rows: true class, columns:
    predicted top-1) and the top-5 hits; every accuracy figure derives from these."""

    def __init__(self, num_classes: int):
        import numpy as np

        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.top5_hits = 0

    def add(self, top, labels) -> None:
        """top: [batch, k] predicted classes, best first; labels: [batch] true classes."""
        import numpy as np

        np.add.at(self.confusion, (labels, top[:, 0]), 1)
        self.top5_hits += int((top == labels[:, None]).any(axis=1).sum())

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return float(self.confusion.trace()) / self.count if self.count else 0.0

    @property
    def top5(self) -> float:
        return self.top5_hits / self.count if self.count else 0.0


def _named_failures(dataset):
    """``dataset``'s batches; where a streamed shard could not be fetched, that failure (TF
    reports only that its input ended in an error)."""
    import tensorflow as tf

    from hrnet.data import stream

    iterator = iter(dataset)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError:
            stream.raise_failure()
            raise


def tally(predict, dataset, num_classes: int, expected: int, what: str, batch_size: int,
          mistakes: Optional["Mistakes"] = None) -> Tally:
    """Run ``predict`` (images -> top-k classes; with ``mistakes``, and the class
    probabilities) over ``dataset`` (batches of images and 0-based labels, each record once);
    checks every label and the record count."""
    result = Tally(num_classes)
    total_batches = -(-expected // batch_size)
    for i, (images, labels) in enumerate(_named_failures(dataset)):
        if mistakes is None:
            top, probabilities = predict(images).numpy(), None
        else:
            top, probabilities = (t.numpy() for t in predict(images))
        labels = labels.numpy()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise HrnetError("%s holds label %d, outside the model's %d classes"
                             % (what, int(labels.max() if labels.max() >= num_classes else labels.min()),
                                num_classes))
        result.add(top, labels)
        if mistakes is not None:
            mistakes.add(images.numpy(), labels, top[:, 0], probabilities)
        if (i + 1) % 50 == 0 or i + 1 == total_batches:
            log.info("evaluated %d/%d images (%d/%d batches), top-1 so far %.4f", result.count, expected, i + 1,
                     total_batches, result.top1)
    if result.count != expected:
        raise HrnetError("evaluated %d records of %s, but the data set says it holds %d"
                         % (result.count, what, expected))
    return result


def top_k_predictor(model, image_size: int, num_classes: int, probabilities: bool = False):
    """A tf.function: float images [batch, size, size, 3] -> the top-5 (or fewer) classes;
    with ``probabilities``, and the softmax over every class."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])
    def predict(images):
        logits = model(images, training=False)
        top = tf.math.top_k(logits, k=min(5, num_classes)).indices
        return (top, tf.nn.softmax(tf.cast(logits, tf.float32))) if probabilities else top

    return predict


# The misclassified images the report shows, and their thumbnails' size in pixels.
MISTAKES = 16
THUMBNAIL = 96


class Mistakes:
    """The ``keep`` misclassified images the model was surest about: the highest loss (the
    lowest probability of the true class), as fastai's top losses; ties go to the earlier
    image. Only these are kept (as thumbnails), so memory does not grow with the split."""

    def __init__(self, keep: int = MISTAKES):
        self.keep = keep
        self._heap: List[tuple] = []  # (loss, -position, entry): the smallest loss on top
        self._seen = 0

    def add(self, images, labels, predicted, probabilities) -> None:
        """A batch: normalized float images, true and predicted (top-1) classes, the softmax."""
        import numpy as np

        wrong = np.nonzero(predicted != labels)[0]
        losses = -np.log(np.maximum(probabilities[wrong, labels[wrong]], 1e-30))
        for i, loss in zip(wrong.tolist(), losses.tolist()):
            key = (loss, -(self._seen + i))
            if len(self._heap) == self.keep and key <= self._heap[0][:2]:
                continue
            entry = {"position": self._seen + i, "true": int(labels[i]), "predicted": int(predicted[i]),
                     "probability": float(probabilities[i, predicted[i]]),
                     "true_probability": float(probabilities[i, labels[i]]), "thumbnail": thumbnail(images[i])}
            (heapq.heappushpop if len(self._heap) == self.keep else heapq.heappush)(self._heap, key + (entry,))
        self._seen += len(labels)

    def worst_first(self) -> List[Dict[str, Any]]:
        return [entry for *_, entry in sorted(self._heap, key=lambda item: item[:2], reverse=True)]


def thumbnail(image):
    """A normalized float image [h, w, 3] back to RGB bytes, at most THUMBNAIL pixels a side."""
    import numpy as np
    from PIL import Image

    from hrnet.data.input import MEAN_RGB, STDDEV_RGB

    rgb = np.clip(np.rint((image * np.float32(STDDEV_RGB) + np.float32(MEAN_RGB)) * 255.0), 0, 255)
    picture = Image.fromarray(rgb.astype(np.uint8))
    if max(picture.size) > THUMBNAIL:
        picture.thumbnail((THUMBNAIL, THUMBNAIL), Image.BILINEAR)
    return picture


# The most-confused pairs listed in metrics.json and the reports.
CONFUSED_PAIRS = 20
# The mistakes' thumbnails in the evaluation folder.
MISTAKE_IMAGE = "mistake-%02d.png"


def most_confused(confusion, names: List[str], top: int = CONFUSED_PAIRS) -> List[Dict[str, Any]]:
    """The ``top`` (true, predicted) pairs of different classes with the most images, most
    first (ties: by true then predicted class)."""
    import numpy as np

    off = confusion.copy()
    np.fill_diagonal(off, 0)
    true, pred = np.nonzero(off)
    order = sorted(zip(true.tolist(), pred.tolist()), key=lambda tp: (-int(off[tp]), tp))[:top]
    return [{"true": t, "true_name": names[t], "predicted": p, "predicted_name": names[p], "count": int(off[t, p]),
             "of": int(confusion[t].sum())} for t, p in order]


def _dataset_info(hdata, data_dir: str, ckpt: Dict[str, Any], split: str, num_classes: Optional[int],
                  label_offset: Optional[int], remote: str = ""):
    """The data set's own description, for ``split`` only. Records without a manifest
    (slim's) are read with the given class count and label offset, else the checkpoint's;
    a manifest's own values win, and one that disagrees with a given value is an error."""
    from hrnet.manifest import MANIFEST

    if os.path.exists(os.path.join(data_dir, MANIFEST)):
        return hdata.dataset_info(data_dir, num_classes=num_classes, label_offset=label_offset, splits=(split,),
                                  remote=remote)
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
             crop_ratio: float = 0.875, weights: str = "best", data_cache_gb: float = DATA_CACHE_GB) -> Dict[str, Any]:
    """Evaluate the model at ``checkpoint`` (a training run's checkpoint folder, or the
    weights ``hrnet import-weights`` wrote) on ``split`` of the data set at ``data``, with
    the official protocol (shorter side to size / ``crop_ratio``, center crop); returns the
    metrics (also written to ``out`` when given). ``num_classes`` / ``label_offset``: for
    records without a manifest (slim's ImageNet: 1000 and 1). ``weights``: "best" (by
    validation top-1, when the run validated) or "last". ``data_cache_gb``: local disk for
    the shards of remote records, streamed (hrnet.data.stream; 0: the split downloaded whole)."""
    from hrnet import data as hdata
    from hrnet.compat import set_mixed_precision
    from hrnet.manifest import file_entry, write_manifest

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1, got %r" % batch_size)
    if not 0 <= data_cache_gb < float("inf"):
        raise ValueError("data_cache_gb must be >= 0 (0: no streaming), got %r" % data_cache_gb)
    set_mixed_precision("float32")  # evaluation is in float32 whatever the training precision was
    ckpt_dir = storage.local_input(checkpoint)
    ckpt = read_model_manifest(ckpt_dir)
    if weights not in WEIGHT_CHOICES:  # before any data moves
        raise HrnetError("weights must be one of %s, got %r" % (", ".join(WEIGHT_CHOICES), weights))
    if out:
        storage.claim_output(out, "evaluation", mark=False)  # a wrong --out fails now, not after the work
    # Only the split evaluated is read (a remote ImageNet: 6 of its 150 GB), streamed.
    data_dir, remote = stage_or_stream(data, (split,), verify=True, stream=data_cache_gb > 0)
    info = _dataset_info(hdata, data_dir, ckpt, split, num_classes, label_offset, remote)
    if info.num_classes != ckpt["num_classes"]:
        raise HrnetError("the checkpoint %s was trained on %d classes, but the data set %s has %d"
                         % (checkpoint, ckpt["num_classes"], data, info.num_classes))
    model, ckpt, picked = load_checkpoint_model(ckpt_dir, image_size, weights)
    size = image_size or ckpt["image_size"]
    expected = info.counts.get(split, 0)
    if not expected:
        raise HrnetError("%s has no %s records to evaluate on" % (data, split))
    num_classes = ckpt["num_classes"]
    start = time.time()
    dataset = hdata.eval_dataset(info, batch_size=batch_size, image_size=size, split=split, crop_ratio=crop_ratio,
                                 data_cache=int(data_cache_gb * GB))
    mistakes = Mistakes()
    result = tally(top_k_predictor(model, size, num_classes, probabilities=True), dataset, num_classes, expected,
                   "%s (%s)" % (data, split), batch_size, mistakes)
    metrics = {
        "top1": result.top1,
        "top5": result.top5,
        "count": result.count,
        "split": split,
        "model": ckpt["model"],
        "weights": picked["which"],
        "step": picked["step"],
        "image_size": size,
        "seconds": round(time.time() - start, 1),
    }
    metrics.update(class_metrics(result.confusion, list(info.class_names), list(info.class_texts)))
    worst = mistakes.worst_first()
    metrics["mistakes"] = [dict({k: v for k, v in m.items() if k != "thumbnail"}, image=MISTAKE_IMAGE % n,
                                true_name=metrics["confusion_matrix"]["classes"][m["true"]],
                                predicted_name=metrics["confusion_matrix"]["classes"][m["predicted"]])
                           for n, m in enumerate(worst, 1)]
    log.info("%s (%s weights, step %s) on %d %s images: top-1 %.4f, top-5 %.4f", ckpt["model"], picked["which"],
             picked["step"], result.count, split, metrics["top1"], metrics["top5"])
    if out:
        with storage.local_output(out, kind="evaluation", force=force) as out_dir:
            path = os.path.join(out_dir, METRICS)
            with open(path, "w") as f:
                f.write(metrics_json(metrics))
            files = [path]
            for entry, mistake in zip(metrics["mistakes"], worst):
                files.append(os.path.join(out_dir, entry["image"]))
                mistake["thumbnail"].save(files[-1])
            write_manifest(out_dir, {
                "kind": "evaluation", "data": data, "checkpoint": checkpoint, "model": ckpt["model"],
                "weights": picked["which"], "step": picked["step"], "split": split, "count": result.count,
                "top1": metrics["top1"], "top5": metrics["top5"], "files": [file_entry(f, out_dir) for f in files],
            })
    return metrics


def metrics_json(metrics: Dict[str, Any]) -> str:
    """metrics.json's text: indented, with one line per confusion-matrix row (ImageNet's
    matrix would otherwise take a million lines)."""
    rows = metrics["confusion_matrix"]["rows"]
    matrix = dict(metrics["confusion_matrix"], rows="@ROWS@")
    text = json.dumps(dict(metrics, confusion_matrix=matrix), indent=2)
    return text.replace('"@ROWS@"', "[\n" + ",\n".join("      " + json.dumps(r) for r in rows) + "\n    ]") + "\n"


def class_metrics(confusion, names: List[str], texts: List[str]) -> Dict[str, Any]:
    """metrics.json's class-level part, all from the confusion matrix: per_class (index ->
    name, text, count, correct, top1), confusion_matrix (rows: true class, columns:
    predicted) and the most-confused pairs."""
    num_classes = confusion.shape[0]
    names = [names[c] if c < len(names) else str(c) for c in range(num_classes)]
    texts = [texts[c] if c < len(texts) else "" for c in range(num_classes)]
    counts, correct = confusion.sum(axis=1), confusion.diagonal()
    return {
        "per_class": {
            str(c): {"name": names[c], "text": texts[c], "count": int(counts[c]), "correct": int(correct[c]),
                     "top1": float(correct[c] / counts[c]) if counts[c] else 0.0}
            for c in range(num_classes)
        },
        "confusion_matrix": {"classes": names, "rows": confusion.tolist()},
        "most_confused": most_confused(confusion, names),
    }


def add_weights_argument(parser) -> None:
    """--use best|last, for evaluate and export."""
    parser.add_argument("--use", dest="weights", default="best", choices=WEIGHT_CHOICES,
                        help="a training run's best weights (by validation top-1; its last ones when it did not "
                             "validate) or its last ones (default best)")


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="data set folder or URI (output of `hrnet convert`)")
    parser.add_argument("--checkpoint", "--weights", dest="checkpoint", required=True,
                        help="checkpoint folder or URI (output of `hrnet train`), or imported weights (output of "
                             "`hrnet import-weights`)")
    parser.add_argument("--out", default=None, help="folder or URI for metrics.json and manifest.json")
    add_weights_argument(parser)
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
    parser.add_argument("--data-cache-gb", type=float, default=DATA_CACHE_GB,
                        help="GB of local disk for the shards of remote records, fetched as they are read and "
                             "deleted after (default %g; 0: download the split whole first)" % DATA_CACHE_GB)
    storage.add_force_argument(parser)


def run(args) -> int:
    m = evaluate(args.data, args.checkpoint, out=args.out, batch_size=args.batch_size, split=args.split,
                 image_size=args.image_size, force=args.force, num_classes=args.num_classes,
                 label_offset=args.label_offset, crop_ratio=args.crop_ratio, weights=args.weights,
                 data_cache_gb=args.data_cache_gb)
    print("%s (%s weights, step %s): top-1 %.2f%%, top-5 %.2f%% on %d %s images" % (
        m["model"], m["weights"], m["step"], 100 * m["top1"], 100 * m["top5"], m["count"], m["split"]))
    return 0

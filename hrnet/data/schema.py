"""The TFRecord layout: TF-slim's ImageNet feature keys (build_imagenet_data.py).

Records made by slim's script are read unchanged and ours are read by slim-style readers.
Labels are stored as slim stores them; the data set's manifest says whether they start
at 1 (slim's ImageNet, 0 = background) or at 0, and readers subtract that offset.
"""
import fnmatch
import os
from typing import Dict, List, Optional, Sequence

from hrnet.fileio import atomic_write

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
CHANNELS = "image/channels"
COLORSPACE = "image/colorspace"
FILENAME = "image/filename"
LABEL = "image/class/label"
SYNSET = "image/class/synset"
TEXT = "image/class/text"
BBOX_XMIN = "image/object/bbox/xmin"
BBOX_YMIN = "image/object/bbox/ymin"
BBOX_XMAX = "image/object/bbox/xmax"
BBOX_YMAX = "image/object/bbox/ymax"
BBOX_LABEL = "image/object/bbox/label"

SPLITS = ("train", "validation")
LABELS_FILE = "labels.txt"


def shard_name(split: str, index: int, num_shards: int) -> str:
    """``train-00000-of-01024``, as slim names its shards."""
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def shard_files(data_dir: str, split: str) -> List[str]:
    """The complete shards of a split in a local folder, sorted (temp files excluded)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"no such data set folder: {data_dir}")
    names = sorted(n for n in os.listdir(data_dir) if fnmatch.fnmatch(n, split + "-[0-9]*-of-[0-9]*")
                   and n.rsplit("-", 1)[-1].isdigit())
    return [os.path.join(data_dir, n) for n in names]


def make_example(encoded: bytes, filename: str, label: int, synset: str, text: str, height: int, width: int,
                 boxes: Optional[Sequence[Sequence[float]]] = None):
    """A tf.train.Example with slim's keys; ``boxes`` as normalized (xmin, ymin, xmax, ymax)."""
    import tensorflow as tf

    boxes = list(boxes or [])

    def _bytes(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    def _floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))

    feature = {
        HEIGHT: _ints([height]),
        WIDTH: _ints([width]),
        COLORSPACE: _bytes(b"RGB"),
        CHANNELS: _ints([3]),
        LABEL: _ints([label]),
        SYNSET: _bytes(synset.encode("utf-8")),
        TEXT: _bytes(text.encode("utf-8")),
        BBOX_XMIN: _floats(b[0] for b in boxes),
        BBOX_YMIN: _floats(b[1] for b in boxes),
        BBOX_XMAX: _floats(b[2] for b in boxes),
        BBOX_YMAX: _floats(b[3] for b in boxes),
        BBOX_LABEL: _ints([label] * len(boxes)),
        FORMAT: _bytes(b"JPEG"),
        FILENAME: _bytes(filename.encode("utf-8")),
        ENCODED: _bytes(encoded),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def feature_spec() -> Dict[str, object]:
    """The parsing spec of what the input pipelines read (a subset of the keys)."""
    import tensorflow as tf

    return {
        ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
        LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
        BBOX_XMIN: tf.io.VarLenFeature(tf.float32),
        BBOX_YMIN: tf.io.VarLenFeature(tf.float32),
        BBOX_XMAX: tf.io.VarLenFeature(tf.float32),
        BBOX_YMAX: tf.io.VarLenFeature(tf.float32),
    }


def parse_labels_file(path: str) -> List[List[str]]:
    """Rows of labels.txt: [label, synset-or-folder, readable name]."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                parts = line.split("\t")
                rows.append((parts + ["", ""])[:3])
    return rows


def write_labels_file(path: str, rows: Sequence[Sequence[object]]) -> None:
    atomic_write(path, "".join(f"{label}\t{name}\t{text}\n" for label, name, text in rows))

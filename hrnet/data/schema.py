"""The TFRecord layout: TF-slim's ImageNet feature keys (build_imagenet_data.py).

Records made by slim's script are read unchanged and ours are read by slim-style readers.
Labels are stored as slim stores them; the data set's manifest says whether they start
at 1 (slim's ImageNet, 0 = background) or at 0, and readers subtract that offset.
"""
import fnmatch
import os
from typing import Dict, List, Optional, Sequence

from hrnet.data import tfrecord as t
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


def is_shard(name: str, split: str) -> bool:
    """Whether a file name is a complete shard of ``split`` (train-00003-of-01024)."""
    return fnmatch.fnmatch(name, split + "-[0-9]*-of-[0-9]*") and name.rsplit("-", 1)[-1].isdigit()


def shard_files(data_dir: str, split: str) -> List[str]:
    """The complete shards of a split in a local folder, sorted (temp files excluded)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"no such data set folder: {data_dir}")
    names = sorted(n for n in os.listdir(data_dir) if is_shard(n, split))
    return [os.path.join(data_dir, n) for n in names]


def serialize_example(encoded: bytes, filename: str, label: int, synset: str, text: str, height: int,
                      width: int, boxes: Optional[Sequence[Sequence[float]]] = None) -> t.Pieces:
    """A serialized tf.train.Example with slim's keys, as pieces (``b"".join`` them, or hand
    them to hrnet.data.tfrecord.RecordWriter.write); ``boxes`` as normalized (xmin, ymin,
    xmax, ymax). Written without TensorFlow (hrnet.data.tfrecord)."""
    boxes = list(boxes or [])
    return t.example({
        HEIGHT: t.int64_feature([height]),
        WIDTH: t.int64_feature([width]),
        COLORSPACE: t.bytes_feature(b"RGB"),
        CHANNELS: t.int64_feature([3]),
        LABEL: t.int64_feature([label]),
        SYNSET: t.bytes_feature(synset.encode("utf-8")),
        TEXT: t.bytes_feature(text.encode("utf-8")),
        BBOX_XMIN: t.float_feature(b[0] for b in boxes),
        BBOX_YMIN: t.float_feature(b[1] for b in boxes),
        BBOX_XMAX: t.float_feature(b[2] for b in boxes),
        BBOX_YMAX: t.float_feature(b[3] for b in boxes),
        BBOX_LABEL: t.int64_feature([label] * len(boxes)),
        FORMAT: t.bytes_feature(b"JPEG"),
        FILENAME: t.bytes_feature(filename.encode("utf-8")),
        ENCODED: t.bytes_feature(encoded),
    })


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

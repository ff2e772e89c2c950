"""Two training processes that must end with the same weights as one (tests/test_launch_train.py
on one machine, tests/test_jobs.py as two TFJob pods).

For the comparison to be exact in principle, the data are arranged so that one global
batch is the same set of images either way:

- two shard files with the same 16 images but different labels: file-level sharding gives
  rank 0 one file and rank 1 the other, so the ranks compute different gradients (weights
  stay equal only if they are really averaged), while their batch-norm statistics agree
  with those of the single process, which sees both files in each batch;
- the crop is the whole image and there is no flip, so preprocessing is deterministic;
- the record shuffle buffer is 1, and a batch is two passes over the data (32 images per
  rank, 64 in the single process), so whatever the file order, every batch holds each
  (image, label) record of its stream exactly twice.

Each process runs the real ``hrnet train`` command line (hrnet.cli.main) through a small
wrapper (WRAPPER) that sets that shuffle buffer and dumps the weights the rank holds after
building the model and at the end (non-chief ranks otherwise write theirs to a scratch
folder that is deleted).
"""
import io
import os

import numpy as np
from helpers import TINY_CONFIG

IMAGES = 16  # per file (fewer make batch norm so ill-conditioned that float32 noise shows)
BATCH = 2 * IMAGES  # per rank: two passes over its file
STEPS = 3


WRAPPER = r'''
"""hrnet train, with a shuffle buffer of 1 and each rank's weights dumped to $DUMP_DIR."""
import functools, json, os, sys

import hrnet.data.input as data_input
import hrnet.model
from hrnet import cli, weights


def rank():
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    return config.get("task", {}).get("index", 0)


original_build, original_save = hrnet.model.build_model, weights.save_weights


def dump(model, tag):
    original_save(model, os.path.join(os.environ["DUMP_DIR"], "rank%d-%s" % (rank(), tag), "weights"))


data_input.train_dataset = functools.partial(data_input.train_dataset, shuffle_buffer=1)


def build_model(*args, **kwargs):
    model = original_build(*args, **kwargs)
    dump(model, "init")
    return model


def save_weights(model, prefix):
    dump(model, "final")
    return original_save(model, prefix)


hrnet.model.build_model, weights.save_weights = build_model, save_weights
sys.exit(cli.main(["train"] + sys.argv[1:]))
'''


def _jpeg(pixels):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def build_dataset(root):
    """train-00000-of-00002 and train-00001-of-00002: the same images, image i labelled i % 4 in
    the first file and (i + 1) % 4 in the second."""
    import tensorflow as tf

    from hrnet.data import schema

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    images = [_jpeg(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(IMAGES)]
    for shard in (0, 1):
        with tf.io.TFRecordWriter(str(root / schema.shard_name("train", shard, 2))) as writer:
            for i in range(IMAGES):
                label = (i + shard) % 4
                writer.write(b"".join(schema.serialize_example(images[i], "img%d.jpg" % i, label, "c%d" % label,
                                                               "class %d" % label, 32, 32)))
    with tf.io.TFRecordWriter(str(root / schema.shard_name("validation", 0, 1))) as writer:
        for i in range(IMAGES):  # validated after every step (an epoch is one step here)
            writer.write(b"".join(schema.serialize_example(images[i], "img%d.jpg" % i, i % 4, "c%d" % (i % 4),
                                                           "class %d" % (i % 4), 32, 32)))
    return root


def train_args(data, out, batch_size):
    return ["--data", str(data), "--out", str(out), "--model", TINY_CONFIG, "--num-classes", "4",
            "--label-offset", "0", "--image-size", "32", "--batch-size", str(batch_size),
            "--nb-train-samples", str(2 * BATCH), "--train-steps", str(STEPS), "--lr", "0.1", "--no-nesterov",
            "--area-range", "1", "1", "--aspect-range", "1", "1", "--no-flip", "--seed", "7", "--log-every", "1",
            "--checkpoint-every", "100"]


def weights_of(dump_dir, rank, tag):
    from hrnet import weights

    return weights.read_weights(os.path.join(dump_dir, f"rank{rank}-{tag}", "weights"))


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def flat(w, keys):
    return np.concatenate([w[k].ravel().astype(np.float64) for k in sorted(keys)])

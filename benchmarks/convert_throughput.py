"""Converter throughput against slim's build_imagenet_data.py algorithm, on the same tree of
generated photo-sized JPEGs (500x375, about 110 KB, like ImageNet's), in one run.

    python benchmarks/convert_throughput.py --images 8000 --workers 2

Three converters, each with ``--workers`` cores, each in its own process (so ours starts
its workers as ``hrnet convert`` does, without TensorFlow in the parent to re-import):
- ours as it runs (worker processes; RGB JPEGs stored byte for byte, size from the header);
- ours with ``verify`` (every image decoded, as slim does);
- slim's algorithm (``slim_convert``: slim's threads, per-image decode and Example, written
  here for TF 2; slim's script itself is TF 1 code).

Each rate is the steady state: the run on all the images minus the run on half of them, so
that start-up (worker processes starting, threads starting) is left out and reported apart;
the best of --rounds such pairs, after a warm-up run. Prints images/s, per core, and the
ratio against slim.
"""
import argparse
import functools
import io
import json
import os
import random
import shutil
import tempfile
import threading
import time

import numpy as np
from PIL import Image
from sides import run_side


def photo(rng: np.random.RandomState, width: int = 500, height: int = 375) -> bytes:
    """A JPEG with a photo's size and entropy: smooth shapes plus sensor-like noise."""
    coarse = Image.fromarray((rng.rand(12, 16, 3) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, np.float32) + rng.normal(0, 20, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=92)
    return out.getvalue()


def make_photos(root: str, n: int, classes: int = 8, seed: int = 0) -> int:
    """train/<class>/ and validation/<class>/ (1 in 10) JPEGs; returns their total bytes."""
    rng = np.random.RandomState(seed)
    distinct = [photo(rng) for _ in range(min(n, 64))]  # encoding is slow; reuse 64 images
    total = 0
    for i in range(n):
        split = "validation" if i % 10 == 9 else "train"
        folder = os.path.join(root, split, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img{i:06d}.JPEG"), "wb") as f:
            f.write(distinct[i % len(distinct)])
        total += len(distinct[i % len(distinct)])
    return total


# ------------------------------------------------------------------- slim's algorithm

def _feature(value):
    import tensorflow as tf

    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, list):
        return tf.train.Feature(float_list=tf.train.FloatList(value=value))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def _slim_example(filename: str, image: bytes, label: int, synset: str, height: int, width: int):
    """The features slim's _convert_to_example writes (no boxes here: empty box lists)."""
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        "image/height": _feature(height), "image/width": _feature(width),
        "image/colorspace": _feature(b"RGB"), "image/channels": _feature(3),
        "image/class/label": _feature(label), "image/class/synset": _feature(synset.encode()),
        "image/class/text": _feature(synset.encode()),
        "image/object/bbox/xmin": _feature([]), "image/object/bbox/xmax": _feature([]),
        "image/object/bbox/ymin": _feature([]), "image/object/bbox/ymax": _feature([]),
        "image/object/bbox/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[])),
        "image/format": _feature(b"JPEG"), "image/filename": _feature(os.path.basename(filename).encode()),
        "image/encoded": _feature(image)}))


def _slim_split(files, out: str, name: str, shards: int, threads: int) -> None:
    """slim's _process_image_files: contiguous ranges, one per thread; each thread writes its
    shards one after the other; per image: read, decode whole (ImageCoder.decode_jpeg,
    channels=3) for the size and the RGB check, build the Example, write."""
    import tensorflow as tf

    bounds = np.linspace(0, len(files), threads + 1).astype(int)

    def work(t: int) -> None:
        per_thread = shards // threads
        shard_bounds = np.linspace(bounds[t], bounds[t + 1], per_thread + 1).astype(int)
        for s in range(per_thread):
            shard = t * per_thread + s
            with tf.io.TFRecordWriter(os.path.join(out, "%s-%.5d-of-%.5d" % (name, shard, shards))) as writer:
                for i in range(shard_bounds[s], shard_bounds[s + 1]):
                    path, label, synset = files[i]
                    with tf.io.gfile.GFile(path, "rb") as f:
                        data = f.read()
                    image = tf.io.decode_jpeg(data, channels=3)
                    assert image.shape[2] == 3
                    writer.write(_slim_example(path, data, label, synset, int(image.shape[0]),
                                               int(image.shape[1])).SerializeToString())

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def slim_convert(src: str, out: str, threads: int, train_shards: int, validation_shards: int) -> None:
    """slim's build_imagenet_data.py on a class-folder tree: labels 1..N by sorted synset, the
    file list shuffled with slim's seed, then each split through _slim_split."""
    os.makedirs(out, exist_ok=True)
    synsets = sorted(os.listdir(os.path.join(src, "train")))
    for split, shards in (("validation", validation_shards), ("train", train_shards)):
        files = [(os.path.join(src, split, s, f), label, s) for label, s in enumerate(synsets, start=1)
                 if os.path.isdir(os.path.join(src, split, s)) for f in sorted(os.listdir(os.path.join(src, split, s)))]
        random.Random(12345).shuffle(files)
        _slim_split(files, out, split, shards, threads)


# ----------------------------------------------------------------------------- timing

def timed(convert, src: str, out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    convert(src, out)
    return time.perf_counter() - start


def steady(convert, half: str, whole: str, n_half: int, n_whole: int, out: str, rounds: int):
    """(images/s at steady state, start-up seconds) from a run on half and one on all: the
    best of ``rounds`` pairs, after a warm-up run (page cache, first ops, imports)."""
    timed(convert, half, out)
    best = (0.0, 0.0)
    for _ in range(rounds):
        t_half, t_whole = timed(convert, half, out), timed(convert, whole, out)
        rate = (n_whole - n_half) / max(t_whole - t_half, 1e-9)
        best = max(best, (rate, max(t_half - n_half / rate, 0.0)))
    return best


def side(name: str, scratch: str, images: int, workers: int, rounds: int) -> dict:
    w, shards = workers, dict(train_shards=workers * 2, validation_shards=workers)
    if name == "slim":
        convert = functools.partial(slim_convert, threads=w, **shards)
    else:
        from hrnet.data.convert import convert_dataset

        convert = functools.partial(convert_dataset, workers=w, verify=name == "verify", progress=False, **shards)
    whole, half, out = (os.path.join(scratch, d) for d in ("whole", "half", "out"))
    rate, startup = steady(convert, half, whole, images // 2, images, out, rounds)
    return {"rate": rate, "startup": startup}


SIDES = {"ours": "ours", "verify": "ours, verify (decodes all)", "slim": "slim's algorithm"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (ours), threads (slim)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs per converter; the best counts")
    parser.add_argument("--dir", help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()

    scratch = args.dir or tempfile.mkdtemp(prefix="hrnet-convert-bench-")
    if args.side:
        print(json.dumps(side(args.side, scratch, args.images, args.workers, args.rounds)))
        return
    n_half = args.images // 2
    try:
        total_bytes = make_photos(os.path.join(scratch, "whole"), args.images)
        make_photos(os.path.join(scratch, "half"), n_half)
        print(f"{args.images} JPEGs (and {n_half} for the start-up), 500x375, "
              f"{total_bytes / args.images / 1024:.0f} KB on average; {args.workers} worker(s) each")
        side_args = ["--dir", scratch] + [f"--{k}={getattr(args, k)}" for k in ("images", "workers", "rounds")]
        figures = {name: run_side(__file__, name, side_args) for name in SIDES}
        slim = figures["slim"]["rate"]
        for name, label in SIDES.items():
            rate, startup = figures[name]["rate"], figures[name]["startup"]
            print(f"{label:27s} {rate:8.1f} images/s, {rate / args.workers:7.1f} per core, {rate / slim:5.2f}x slim "
                  f"(start-up {startup:.1f} s)")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Converter throughput on generated photo-sized JPEGs (500x375, about 110 KB, like ImageNet's).

    python benchmarks/convert_throughput.py --images 800 --workers 4

Prints images/s on one core (in-process, TensorFlow already loaded) for the converter as it
runs (RGB JPEGs stored byte for byte, size from the header) and for decoding every image
(``verify``, what slim's build_imagenet_data.py pays), then images/s total and per core
with the worker processes (steady state, their start-up measured apart). For scale:
slim's script does about 150 images/s with 16 threads.
"""
import argparse
import io
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from hrnet.data.convert import convert_dataset  # noqa: E402


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


def timed_convert(src: str, out: str, workers: int, **kw) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    convert_dataset(src, out, workers=workers, progress=False, **kw)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args()

    scratch = args.dir or tempfile.mkdtemp(prefix="hrnet-convert-bench-")
    src, out = os.path.join(scratch, "src"), os.path.join(scratch, "out")
    try:
        total_bytes = make_photos(src, args.images)
        print(f"{args.images} JPEGs, 500x375, {total_bytes / args.images / 1024:.0f} KB on average")
        shards = dict(train_shards=max(args.workers * 2, 2), validation_shards=2)
        timed_convert(src, out, 1, **shards)  # warm-up: TensorFlow import, page cache
        one = timed_convert(src, out, 1, **shards)
        decode_all = timed_convert(src, out, 1, verify=True, **shards)
        print(f"1 core, header only (as converted): {args.images / one:8.1f} images/s")
        print(f"1 core, decoding every image:       {args.images / decode_all:8.1f} images/s")
        if args.workers > 1:
            # Workers start by importing TensorFlow (seconds); the difference between a run on
            # half and on all of the images is the steady rate, without that start-up.
            half = os.path.join(scratch, "half")
            make_photos(half, args.images // 2)
            t_half = timed_convert(half, out, args.workers, **shards)
            t_all = timed_convert(src, out, args.workers, **shards)
            rate = (args.images - args.images // 2) / max(t_all - t_half, 1e-9)
            startup = max(t_half - (args.images // 2) / rate, 0.0)
            print(f"{args.workers} worker processes: {rate:8.1f} images/s total, {rate / args.workers:.1f} per core "
                  f"(steady state; start-up {startup:.1f} s)")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

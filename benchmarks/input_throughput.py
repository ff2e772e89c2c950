"""tf.data input pipeline throughput on records of generated photo-sized JPEGs (500x375, ~110 KB).

    python benchmarks/input_throughput.py --images 1000 --batch 64 --size 224

Prints images/s total and per core for the train pipeline (random crop with the fused
decode_and_crop_jpeg, flip, resize, normalize) and the eval pipeline (center crop), with
nothing else running: the rate a training step must not exceed to be fed in time.
"""
import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from convert_throughput import make_photos  # noqa: E402

from hrnet import data  # noqa: E402
from hrnet.data.convert import convert_dataset  # noqa: E402
from hrnet.data.input import DTYPES  # noqa: E402


def rate(dataset, batches: int, warmup: int) -> float:
    """Images/s over ``batches`` batches, after ``warmup`` batches (tracing, buffer fill)."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(iterator)
        images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--dir", help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    scratch = args.dir or tempfile.mkdtemp(prefix="hrnet-input-bench-")
    src, out = os.path.join(scratch, "src"), os.path.join(scratch, "records")
    try:
        if not os.path.exists(os.path.join(out, "manifest.json")):
            make_photos(src, args.images)
            convert_dataset(src, out, train_shards=16, validation_shards=4, progress=False)
        info = data.dataset_info(out)
        print(f"{info.counts['train']} train / {info.counts['validation']} validation records "
              f"of 500x375 JPEGs; {args.size}x{args.size} {args.dtype}, batch {args.batch}, {cores} cores")
        # A small shuffle buffer: the benchmark measures decoding, not the buffer's first fill.
        train = data.train_dataset(info, args.batch, args.size, dtype=args.dtype, shuffle_buffer=256)
        r = rate(train, args.batches, warmup=5)
        print(f"train pipeline: {r:8.1f} images/s total, {r / cores:.1f} per core")
        evaluation = data.eval_dataset(info, args.batch, args.size, dtype=args.dtype).repeat()
        r = rate(evaluation, args.batches, warmup=5)
        print(f"eval pipeline:  {r:8.1f} images/s total, {r / cores:.1f} per core")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

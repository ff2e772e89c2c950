"""Input pipeline throughput against torchvision's, on the same generated photo-sized JPEGs
(500x375, ~110 KB), in one run.

    python benchmarks/input_throughput.py --images 1000 --batch 64 --size 224

Ours: tf.data on the records converted from the JPEG tree; train = the fused
decode_and_crop_jpeg random crop, flip, resize, normalize; eval = center crop. torchvision
(torch extra): what a PyTorch user runs on that tree, ImageFolder + RandomResizedCrop +
RandomHorizontalFlip + ToTensor + Normalize (eval: Resize + CenterCrop) in a DataLoader
with a worker per core, in its own process. Prints images/s in total and per core, and the
ratio ours / torchvision: the rate a training step must not exceed to be fed in time.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from convert_throughput import make_photos  # noqa: E402
from sides import run_side  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rate(batches_of, batches: int, warmup: int, rounds: int) -> float:
    """Images/s over ``batches`` batches after ``warmup`` batches (tracing, workers, buffers):
    the best of ``rounds`` such stretches, the one least disturbed by the machine's other load."""
    iterator = iter(batches_of)
    for _ in range(warmup):
        next(iterator)
    best = 0.0
    for _ in range(rounds):
        images = 0
        start = time.perf_counter()
        for _ in range(batches):
            x, _ = next(iterator)
            images += int(x.shape[0])
        best = max(best, images / (time.perf_counter() - start))
    return best


def ours(src: str, records: str, batch: int, size: int, batches: int, rounds: int, dtype: str) -> dict:
    from hrnet import data
    from hrnet.data.convert import convert_dataset

    if not os.path.exists(os.path.join(records, "manifest.json")):
        convert_dataset(src, records, train_shards=16, validation_shards=4, progress=False)
    info = data.dataset_info(records)
    # A small shuffle buffer: the benchmark measures decoding, not the buffer's first fill.
    train = data.train_dataset(info, batch, size, dtype=dtype, shuffle_buffer=256)
    evaluation = data.eval_dataset(info, batch, size, dtype=dtype).repeat()
    return {"train": rate(train, batches, 5, rounds), "eval": rate(evaluation, batches, 5, rounds)}


def torchvision_side(src: str, batch: int, size: int, batches: int, rounds: int) -> dict:
    import itertools

    import torch
    from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import datasets, transforms

    # The PyTorch side's own constants (the same values as ours): TensorFlow stays out of
    # this process, whose DataLoader workers are forked.
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] + normalize)
    evaluation = transforms.Compose([transforms.Resize(int(size / DEFAULT_CROP_PCT)), transforms.CenterCrop(size)]
                                    + normalize)

    def loader(split, transform, shuffle):
        folder = datasets.ImageFolder(os.path.join(src, split), transform=transform)
        batches_of = torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=shuffle, num_workers=CORES,
                                                 persistent_workers=True, drop_last=True)
        return itertools.chain.from_iterable(itertools.repeat(batches_of))  # epochs one after another

    return {"train": rate(loader("train", train, True), batches, 5, rounds),
            "eval": rate(loader("validation", evaluation, False), batches, 5, rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="stretches of --batches per figure; the best counts")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--dir", help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--side", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.images // 10 < args.batch:  # torchvision's drop_last loader would yield no batch
        parser.error(f"--images {args.images} gives {args.images // 10} validation images, fewer than one "
                     f"batch of {args.batch}: use --images {10 * args.batch} or more")

    scratch = args.dir or tempfile.mkdtemp(prefix="hrnet-input-bench-")
    src, records = os.path.join(scratch, "src"), os.path.join(scratch, "records")
    if args.side:
        figures = (ours(src, records, args.batch, args.size, args.batches, args.rounds, args.dtype)
                   if args.side == "ours" else torchvision_side(src, args.batch, args.size, args.batches, args.rounds))
        print(json.dumps(figures))
        return
    try:
        if not os.path.isdir(src):
            make_photos(src, args.images)
        print(f"{args.images} JPEGs of 500x375 (1 in 10 for validation); {args.size}x{args.size}, "
              f"batch {args.batch}, {CORES} cores; ours {args.dtype}")
        passed = ("batch", "size", "batches", "rounds", "dtype")
        side_args = ["--dir", scratch] + [f"--{k}={getattr(args, k)}" for k in passed]
        figures = {side: run_side(__file__, side, side_args) for side in ("ours", "torchvision")}
        for what in ("train", "eval"):
            a, b = figures["ours"][what], figures["torchvision"][what]
            print(f"{what:5s} pipeline  ours {a:7.1f} images/s ({a / CORES:6.1f} per core)   torchvision "
                  f"{b:7.1f} ({b / CORES:6.1f} per core)   ratio {a / b:5.2f}x")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

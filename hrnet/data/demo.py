"""The demo data set: scikit-learn's bundled handwritten digits as a class-folder JPEG tree.

1,797 real 8x8 images in 10 classes, upscaled to a size the model accepts (a multiple of
32) and split once, stratified with a fixed seed, into ``train/<class>/`` and
``validation/<class>/``. Class folders are named ``0`` .. ``9`` so that sorting them gives
the digit. Small enough to train on two CPU cores in minutes, real enough that accuracy
means something.
"""
import logging
import os
from typing import Any, Dict

import numpy as np

from hrnet import storage
from hrnet.errors import HrnetError
from hrnet.manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)

SPLIT_SEED = 20240607


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise HrnetError("the demo data set needs scikit-learn (pip install scikit-learn)") from e
    digits = load_digits()
    return digits.images, digits.target


def split_indices(targets: np.ndarray, validation_fraction: float, seed: int = SPLIT_SEED):
    """Stratified train / validation indices, the same on every machine and numpy version.

    Every class keeps round(fraction * n) images for validation; both lists are sorted.
    """
    rng = np.random.RandomState(seed)
    train, validation = [], []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        members = members[rng.permutation(len(members))]
        n_val = int(round(validation_fraction * len(members)))
        validation.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(validation)


def write_demo_data(out_dir: str, size: int = 32, validation_fraction: float = 0.2, quality: int = 95,
                    seed: int = SPLIT_SEED, force: bool = False) -> Dict[str, Any]:
    """Write the digits as ``out_dir/{train,validation}/<digit>/digit_NNNN.jpg``.

    ``size`` is the side of the square RGB JPEGs (a multiple of 32; 32 keeps the demo fast).
    Returns the manifest (counts per split and class), which is also written last as
    ``manifest.json``.
    """
    from PIL import Image

    if size <= 0 or size % 32:
        raise ValueError(f"demo image size must be a positive multiple of 32 (the model's stride), got {size!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction!r}")
    images, targets = _load_digits()
    train, validation = split_indices(targets, validation_fraction, seed)
    classes = [str(c) for c in range(10)]
    counts = {"train": {c: 0 for c in classes}, "validation": {c: 0 for c in classes}}
    with storage.local_output(out_dir, kind="image-folders", force=force) as out:
        for split, indices in (("train", train), ("validation", validation)):
            for c in classes:
                os.makedirs(os.path.join(out, split, c), exist_ok=True)
            for i in indices:
                label = str(int(targets[i]))
                # 0..16 ink levels -> 0..255; white digits on black, like the originals.
                pixels = np.clip(images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")
                image.save(os.path.join(out, split, label, f"digit_{i:04d}.jpg"), "JPEG", quality=quality)
                counts[split][label] += 1
        manifest = {
            "kind": "image-folders",
            "source": "scikit-learn load_digits",
            "image_size": size,
            "num_classes": len(classes),
            "classes": classes,
            "counts": {split: sum(per_class.values()) for split, per_class in counts.items()},
            "counts_per_class": counts,
            "split_seed": seed,
            "validation_fraction": validation_fraction,
        }
        write_manifest(out, manifest)
        manifest = read_manifest(out)
    log.info("demo data: %d train and %d validation images (%dx%d) in %s",
             manifest["counts"]["train"], manifest["counts"]["validation"], size, size, out_dir)
    return manifest


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder (or s3:// / minio:// URI) to write the JPEG tree into")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels, a multiple of 32 (default 32)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of each class held out for validation (default 0.2)")
    storage.add_force_argument(parser)


def run(args) -> int:
    # It logs what it wrote.
    write_demo_data(args.out, size=args.size, validation_fraction=args.validation_fraction, force=args.force)
    return 0

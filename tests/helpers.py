"""Builders the tests share: the small model configs and class-folder JPEG trees."""
import os
import pathlib
from typing import Callable, Dict, Optional, Sequence

CONFIGS = pathlib.Path(__file__).parent / "configs"
# HRNets with the full structure and few channels: tiny (2 branches) for resume and storage
# tests, small (four stages, ~0.75 M parameters) where the model must learn.
TINY_CONFIG = str(CONFIGS / "tiny.yaml")
SMALL_CONFIG = str(CONFIGS / "small.yaml")


def noise_image(rng, label: int, size=(32, 32)):
    """Uniform noise, the same for every class (label unused): what only the labels tell apart."""
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype="uint8")


def write_jpeg_tree(root, per_split: Dict[str, Sequence[int]], image: Optional[Callable] = None,
                    class_name: str = "class{}", file_name: str = "{}.jpg", seed: int = 0, quality: int = 90) -> str:
    """``root/<split>/<class_name>/<file_name>`` JPEGs: ``per_split[split][c]`` images of class c,
    each ``image(rng, c)`` (uint8 HxWx3; default noise_image). Returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = image or noise_image
    for split, counts in per_split.items():
        for c, n in enumerate(counts):
            folder = os.path.join(str(root), split, class_name.format(c))
            os.makedirs(folder)
            for i in range(n):
                Image.fromarray(image(rng, c)).save(os.path.join(folder, file_name.format(i)), quality=quality)
    return str(root)


def write_images(root, classes: int = 3, train: int = 8, validation: int = 2) -> str:
    """The small noise tree the storage and ownership tests convert: 3 classes, 8 + 2 each."""
    return write_jpeg_tree(root, {"train": [train] * classes, "validation": [validation] * classes})

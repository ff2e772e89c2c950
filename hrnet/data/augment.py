"""The training augmentation as data: what the train pipeline does to each image besides
decoding, resizing and normalizing it. Free of TensorFlow, so that a config is checked
(``hrnet train``'s flags, the pipeline's validate step) without starting it."""
from dataclasses import dataclass
from typing import Tuple

# The official HRNet / torchvision recipe: RandomResizedCrop's ranges.
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class Augment:
    """A random crop of ``area_range`` of the image with an aspect ratio in ``aspect_range``
    (with ``use_boxes``: covering at least ``min_object_covered`` of one of the record's
    bounding boxes, the Inception recipe), resized, then flipped left-right at random unless
    ``flip`` is False (data where mirroring changes the meaning: digits, text)."""

    area_range: Tuple[float, float] = AREA_RANGE
    aspect_range: Tuple[float, float] = ASPECT_RATIO_RANGE
    flip: bool = True
    use_boxes: bool = False
    min_object_covered: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "area_range", tuple(self.area_range))
        object.__setattr__(self, "aspect_range", tuple(self.aspect_range))
        lo, hi = self.area_range
        if not 0 < lo <= hi <= 1:
            raise ValueError("area_range must satisfy 0 < min <= max <= 1, got %s" % (self.area_range,))
        lo, hi = self.aspect_range
        if not 0 < lo <= hi:
            raise ValueError("aspect_range must satisfy 0 < min <= max, got %s" % (self.aspect_range,))
        if not 0 <= self.min_object_covered <= 1:
            raise ValueError("min_object_covered must be in [0, 1], got %s" % (self.min_object_covered,))

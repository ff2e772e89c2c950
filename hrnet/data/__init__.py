"""Data: the TFRecord schema, the converter, the tf.data pipelines and the demo data set.

``from hrnet.data import train_dataset`` etc. load TensorFlow on first use only, so that
``hrnet demo-data`` and the converter's command line start quickly.
"""
import importlib

_INPUT_NAMES = (
    "AREA_RANGE", "ASPECT_RATIO_RANGE", "CROP_RATIO", "MEAN_RGB", "STDDEV_RGB", "DatasetInfo",
    "center_crop_window", "count_records", "dataset_info", "decode_and_center_crop", "decode_and_random_crop",
    "distorted_crop_window", "eval_dataset", "locate_corrupt_record", "normalize", "parse_record",
    "preprocess_for_eval", "preprocess_for_train", "resize", "train_dataset",
)
__all__ = list(_INPUT_NAMES)


def __getattr__(name):
    if name in _INPUT_NAMES:
        return getattr(importlib.import_module("hrnet.data.input"), name)
    raise AttributeError(f"module 'hrnet.data' has no attribute {name!r}")

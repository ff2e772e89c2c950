"""Data: the TFRecord schema, the converter, the data set folder, the tf.data pipelines and
the demo data set.

``from hrnet.data import train_dataset`` etc. load TensorFlow on first use only, so that
``hrnet demo-data`` and the converter's command line start quickly.
"""
import importlib

_NAMES = {
    "hrnet.data.folder": ("DatasetInfo", "class_names_from_records", "count_records", "dataset_info",
                          "locate_corrupt_record"),
    "hrnet.data.augment": ("AREA_RANGE", "ASPECT_RATIO_RANGE", "Augment"),
    "hrnet.data.input": ("CROP_RATIO", "MEAN_RGB", "STDDEV_RGB",
                         "center_crop_window", "decode_and_center_crop", "decode_and_random_crop",
                         "distorted_crop_window", "eval_dataset", "normalize", "parse_record",
                         "preprocess_for_eval", "preprocess_for_train", "resize", "train_dataset"),
}
_MODULE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name):
    if name in _MODULE:
        return getattr(importlib.import_module(_MODULE[name]), name)
    raise AttributeError(f"module 'hrnet.data' has no attribute {name!r}")

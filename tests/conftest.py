"""Fixtures every test module may ask for: the S3 test servers (tests/s3server.py), the demo
digits, and one tiny trained run."""
import os
import pathlib
from dataclasses import dataclass

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before any test module imports TensorFlow: hrnet turns oneDNN on as it does for its users.
import hrnet  # noqa: E402, F401, I001

# The S3 test server fixtures (s3_server, s3_env) for every test module: see tests/s3server.py.
from helpers import (  # noqa: E402
    TINY_CONFIG,
    TINY_RUN_CLASSES,
    TINY_RUN_VALIDATION,
    tinted_image,
    write_jpeg_tree,
)
from s3server import both_servers, every_server, gateway_server, moto_server, s3_env, s3_server, seaweedfs_server  # noqa: E402, F401


@dataclass(frozen=True)
class Digits:
    jpeg: pathlib.Path  # the demo data set's image tree (hrnet demo-data)
    records: pathlib.Path  # its TFRecords: 2 train and 2 validation shards
    jpeg_manifest: dict  # what write_demo_data returned
    records_manifest: dict  # what convert_dataset returned


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Digits:
    """The demo digits (1438 train, 359 validation, 10 classes), made once for every module
    that reads them; no test writes into them."""
    from hrnet.data.convert import convert_dataset
    from hrnet.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("digits")
    made = write_demo_data(str(root / "jpeg"))
    converted = convert_dataset(str(root / "jpeg"), str(root / "records"), train_shards=2, validation_shards=2,
                                workers=1, progress=False)
    return Digits(root / "jpeg", root / "records", made, converted)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    """tree/ (helpers.TINY_RUN_* classes of tinted JPEGs), records/ of it, and ckpt/: a tiny
    HRNet trained for two steps. For the tests that only read a checkpoint: what it predicts
    does not matter, that evaluate and export reproduce it exactly does."""
    from hrnet.data.convert import convert_dataset
    from hrnet.train.loop import train

    root = tmp_path_factory.mktemp("tiny-run")
    write_jpeg_tree(root / "tree", {"train": [6] * TINY_RUN_CLASSES, "validation": TINY_RUN_VALIDATION},
                    image=tinted_image, class_name="class_{}", file_name="img{}.jpg")
    convert_dataset(str(root / "tree"), str(root / "records"), train_shards=1, validation_shards=3, workers=1,
                    progress=False)
    train({"data": str(root / "records"), "out": str(root / "ckpt"), "model": TINY_CONFIG,
           "image_size": 32, "batch_size": 8, "train_steps": 2, "lr": 0.05, "log_every": 1, "seed": 0})
    return root

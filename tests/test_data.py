"""The demo data set, dataset_info and the train / eval tf.data pipelines on it."""
import os

import numpy as np
import pytest
from PIL import Image

from hrnet.cli import main as cli_main
from hrnet.data.demo import split_indices
from hrnet.errors import HrnetError
from hrnet.manifest import read_manifest


@pytest.fixture(scope="module")
def demo(digits):
    """(the image tree, what write_demo_data returned) of conftest's digits."""
    return str(digits.jpeg), digits.jpeg_manifest


@pytest.fixture(scope="module")
def records(digits):
    """(the records, what convert_dataset returned) of conftest's digits."""
    return str(digits.records), digits.records_manifest


def test_demo_data_is_the_digits_split_per_class(demo):
    root, manifest = demo
    assert read_manifest(root, kind="image-folders") == manifest
    counts = {}
    for split in ("train", "validation"):
        classes = sorted(os.listdir(os.path.join(root, split)))
        assert classes == [str(d) for d in range(10)]
        counts[split] = {c: len(os.listdir(os.path.join(root, split, c))) for c in classes}
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 1797
    for c in counts["train"]:
        n = counts["train"][c] + counts["validation"][c]
        assert counts["validation"][c] == round(0.2 * n)  # stratified
    assert manifest["counts_per_class"] == counts
    path = os.path.join(root, "validation", "7", sorted(os.listdir(os.path.join(root, "validation", "7")))[0])
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
        pixels = np.asarray(image)
    assert pixels.max() > 200 and pixels.min() < 40  # a real digit, not a blank


def test_demo_split_is_fixed_and_disjoint():
    targets = np.repeat(np.arange(10), 30)
    train, validation = split_indices(targets, 0.2)
    assert (train, validation) == split_indices(targets, 0.2)
    assert not set(train) & set(validation)
    assert sorted(train + validation) == list(range(300))
    assert split_indices(targets, 0.2, seed=1) != (train, validation)


def test_demo_data_cli_size_and_bad_size(tmp_path, capsys):
    assert cli_main(["demo-data", "--out", str(tmp_path / "d64"), "--size", "64"]) == 0
    assert read_manifest(str(tmp_path / "d64"))["counts"] == {"train": 1438, "validation": 359}
    zero = str(tmp_path / "d64" / "train" / "0")
    with Image.open(os.path.join(zero, os.listdir(zero)[0])) as im:
        assert im.size == (64, 64)
    assert cli_main(["demo-data", "--out", str(tmp_path / "bad"), "--size", "40"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_dataset_info_reads_the_manifest(records):
    from hrnet.data import dataset_info

    out, manifest = records
    info = dataset_info(out)
    assert (info.num_classes, info.label_offset) == (10, 0)
    assert info.class_names == [str(d) for d in range(10)]
    assert info.counts == {"train": 1438, "validation": 359}
    assert [os.path.basename(f) for f in info.files["validation"]] == [
        "validation-00000-of-00002", "validation-00001-of-00002"]
    assert sum(info.counts_per_class["train"].values()) == 1438
    with pytest.raises(HrnetError, match="num_classes=12 given"):
        dataset_info(out, num_classes=12)


def test_train_dataset_batches_shapes_and_determinism(records):
    from hrnet.data import Augment, train_dataset

    out, _ = records

    def first_batches(**kw):
        ds = train_dataset(out, 8, 32, augment=Augment(flip=False), shuffle_buffer=64, **kw)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(3)]

    a = first_batches(seed=7)
    b = first_batches(seed=7)
    c = first_batches(seed=8)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    x, y = a[0]
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert 0 <= y.min() and y.max() <= 9
    # Normalized with the ImageNet mean/std: black is about -2, white about +2.5.
    assert -2.2 < x.min() < -1.5 and 1.5 < x.max() < 2.7

    half = train_dataset(out, 4, (64, 32), dtype="bfloat16", seed=1)
    xh, _ = next(iter(half))
    assert xh.shape == (4, 64, 32, 3) and xh.dtype.name == "bfloat16"


def test_train_dataset_rejects_bad_arguments(records, tmp_path):
    from hrnet.data import Augment, train_dataset

    out, _ = records
    with pytest.raises(ValueError, match="area_range"):
        train_dataset(out, 8, 32, augment=Augment(area_range=(0.0, 1.0)))
    with pytest.raises(ValueError, match="worker_index"):
        train_dataset(out, 8, 32, num_workers=2, worker_index=2)
    with pytest.raises(ValueError, match="dtype"):
        train_dataset(out, 8, 32, dtype="int8")
    with pytest.raises(HrnetError, match="label_offset"):
        train_dataset(str(tmp_path), 8, 32)


def test_eval_dataset_covers_the_validation_split_once(records, demo):
    from hrnet.data import eval_dataset

    out, _ = records
    sizes, names, labels = [], [], []
    for x, y, f in eval_dataset(out, 100, 32, with_filenames=True):
        sizes.append(int(x.shape[0]))
        names.extend(f.numpy().tolist())
        labels.extend(y.numpy().tolist())
    assert sizes == [100, 100, 100, 59]  # last partial batch kept
    assert len(set(names)) == 359
    # The label matches the class folder the image came from.
    root = demo[0]
    assert all(os.path.exists(os.path.join(root, "validation", str(label), n.decode()))
               for n, label in zip(names, labels))

"""The input pipelines: slim compatibility both ways, crop windows, eval coverage, worker shards."""
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from hrnet import data
from hrnet.data.convert import convert_dataset


def smooth_image(w, h, seed=0):
    """Low-frequency colours: resizing it by different methods gives nearly the same pixels."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w] / float(max(w, h))
    channels = [127 + 120 * np.sin(2.5 * x * rng.uniform(1, 2) + 3 * y * rng.uniform(0, 1) + rng.uniform(0, 6))
                for _ in range(3)]
    return np.stack(channels, -1).astype(np.uint8)


def encode(array, fmt="JPEG", **kw):
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **kw)
    return out.getvalue()


def class_tree(root, train_per_class, val_per_class):
    """class00/ class01/ ... with the given number of images each."""
    for split, counts in (("train", train_per_class), ("validation", val_per_class)):
        for c, n in enumerate(counts):
            folder = os.path.join(root, split, f"class{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                with open(os.path.join(folder, f"{c}_{i}.jpg"), "wb") as f:
                    f.write(encode(smooth_image(40 + i, 32, c * 10 + i)))
    return root


# ------------------------------------------------------------------ slim compatibility

SLIM_KEYS = {  # written out from slim's build_imagenet_data.py, not from hrnet.data.schema
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/channels": tf.io.FixedLenFeature([], tf.int64),
    "image/colorspace": tf.io.FixedLenFeature([], tf.string),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/synset": tf.io.FixedLenFeature([], tf.string),
    "image/class/text": tf.io.FixedLenFeature([], tf.string),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/label": tf.io.VarLenFeature(tf.int64),
}


def slim_example(image_buffer, label, synset, human, bbox, height, width, filename):
    """slim's _convert_to_example, transcribed (bbox: [[xmin, ymin, xmax, ymax], ...])."""
    xmin, ymin, xmax, ymax = [], [], [], []
    for b in bbox:
        for values, point in zip([xmin, ymin, xmax, ymax], b):
            values.append(point)

    def _int64(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v if isinstance(v, list) else [v]))

    def _float(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=v))

    def _bytes(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/height": _int64(height), "image/width": _int64(width), "image/colorspace": _bytes(b"RGB"),
        "image/channels": _int64(3), "image/class/label": _int64(label), "image/class/synset": _bytes(synset),
        "image/class/text": _bytes(human), "image/object/bbox/xmin": _float(xmin),
        "image/object/bbox/xmax": _float(xmax), "image/object/bbox/ymin": _float(ymin),
        "image/object/bbox/ymax": _float(ymax), "image/object/bbox/label": _int64([label] * len(xmin)),
        "image/format": _bytes(b"JPEG"), "image/filename": _bytes(filename.encode()),
        "image/encoded": _bytes(image_buffer)}))


def test_our_records_read_by_a_slim_reader(tmp_path):
    src = class_tree(str(tmp_path / "src"), [2, 3], [1, 1])
    out = str(tmp_path / "out")
    convert_dataset(src, out, label_offset=1, workers=1, progress=False)
    records = []
    for name in sorted(os.listdir(out)):
        if name.startswith(("train-", "validation-")):
            for r in tf.data.TFRecordDataset(os.path.join(out, name)):
                records.append(tf.io.parse_single_example(r, SLIM_KEYS))
    assert len(records) == 7
    for f in records:
        image = tf.io.decode_jpeg(f["image/encoded"], channels=3)
        assert image.shape[:2] == (f["image/height"], f["image/width"])
        synset = f["image/class/synset"].numpy().decode()
        assert f["image/class/label"] == int(synset[-2:]) + 1  # slim's 1..N, 0 = background
        assert f["image/format"] == b"JPEG" and f["image/colorspace"] == b"RGB" and f["image/channels"] == 3
        assert f["image/class/text"].numpy().decode() == synset


@pytest.fixture(scope="module")
def slim_records(tmp_path_factory):
    """Records as slim's script writes them: 1-based labels, some with boxes, no manifest."""
    root = str(tmp_path_factory.mktemp("slim"))
    boxes = {}
    for split, shards in (("train", 2), ("validation", 1)):
        for s in range(shards):
            with tf.io.TFRecordWriter(os.path.join(root, f"{split}-{s:05d}-of-{shards:05d}")) as w:
                for i in range(5):
                    label = 1 + (i + s) % 3
                    bbox = [[0.25, 0.1, 0.75, 0.6]] if i % 2 else []
                    name = f"{split}_{s}_{i}.JPEG"
                    boxes[name] = bbox
                    w.write(slim_example(encode(smooth_image(64, 48, i + 5 * s)), label, b"n%08d" % label,
                                         b"thing", bbox, 48, 64, name).SerializeToString())
    return root, boxes


def test_slim_records_through_our_pipelines(slim_records):
    root, boxes = slim_records
    with pytest.raises(Exception, match="num_classes and label_offset"):
        data.dataset_info(root)
    with pytest.raises(Exception, match="labels 1..3, outside 0..2 .*label_offset=1"):
        data.dataset_info(root, num_classes=3, label_offset=0)
    with pytest.raises(Exception, match="outside"):
        data.train_dataset(root, 2, 32, num_classes=2, label_offset=1)
    info = data.dataset_info(root, num_classes=3, label_offset=1)
    assert info.counts == {"train": 10, "validation": 5}
    assert info.manifest is None and len(info.files["train"]) == 2

    for use_boxes in (False, True):
        ds = data.train_dataset(root, 5, 32, label_offset=1, augment=data.Augment(use_boxes=use_boxes), seed=3,
                                repeat=False)
        labels = np.concatenate([y.numpy() for _, y in ds])
        assert sorted(labels.tolist()) == sorted([(i + s) % 3 for s in range(2) for i in range(5)])
    ev = list(data.eval_dataset(root, 2, 32, label_offset=1, with_filenames=True))
    assert [int(y.shape[0]) for _, y, _ in ev] == [2, 2, 1]
    assert sorted(n.decode() for _, _, f in ev for n in f.numpy()) == sorted(n for n in boxes if n[0] == "v")

    # The boxes come out of parse_record as (ymin, xmin, ymax, xmax).
    for r in tf.data.TFRecordDataset(info.files["train"][0]):
        parsed = data.parse_record(r, label_offset=1)
        want = [[b[1], b[0], b[3], b[2]] for b in boxes[parsed["filename"].numpy().decode()]]
        np.testing.assert_allclose(parsed["boxes"].numpy().reshape(-1, 4), np.reshape(want, (-1, 4)))


# ------------------------------------------------------------------ preprocessing

def test_random_crop_windows_follow_the_official_ranges_and_the_boxes():
    shape = tf.constant([100, 200, 3])
    fallbacks = 0
    for i in range(200):
        y, x, h, w = data.distorted_crop_window(shape, tf.constant([7, i])).numpy()
        assert 0 <= y and 0 <= x and y + h <= 100 and x + w <= 200
        if (h, w) == (100, 200):
            fallbacks += 1  # no window found in 10 attempts: the whole image
            continue
        assert 0.08 * 0.9 <= h * w / 20000.0 <= 1.0
        assert 0.75 * 0.9 <= w / h <= 4.0 / 3.0 * 1.1
    assert fallbacks < 20
    narrow = [data.distorted_crop_window(shape, tf.constant([1, i]), area_range=(0.3, 0.4)).numpy() for i in range(50)]
    assert all(0.27 <= h * w / 20000.0 <= 0.44 or (h, w) == (100, 200) for _, _, h, w in narrow)

    box = tf.constant([[0.1, 0.05, 0.4, 0.25]])  # ymin, xmin, ymax, xmax: 30 x 40 pixels
    for i in range(100):
        y, x, h, w = data.distorted_crop_window(shape, tf.constant([2, i]), boxes=box,
                                                min_object_covered=0.5).numpy()
        overlap = max(0, min(y + h, 40) - max(y, 10)) * max(0, min(x + w, 50) - max(x, 10))
        assert overlap >= 0.5 * 30 * 40 - 1 or (h, w) == (100, 200)


def test_eval_preprocessing_matches_resize_then_center_crop():
    array = smooth_image(90, 60, 1)
    size = 32
    # The official evaluation: PIL resize of the shorter side to size / 0.875, center crop.
    short = int(size / 0.875)
    resized = Image.fromarray(array).resize((round(90 * short / 60), short), Image.BILINEAR)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    want = np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)
    for encoded in (encode(array, "PNG"), encode(array, quality=98)):
        got = data.preprocess_for_eval(tf.constant(encoded), size).numpy()
        assert got.shape == (size, size, 3)
        pixels = (got * np.array(data.STDDEV_RGB) + np.array(data.MEAN_RGB)) * 255.0
        assert np.abs(pixels - want).mean() < 4.0
    non_square = data.preprocess_for_eval(tf.constant(encode(array, "PNG")), (64, 32))
    assert non_square.shape == (64, 32, 3)


def test_train_preprocessing_flip_and_normalization():
    array = np.zeros((48, 64, 3), np.uint8)
    array[:, :32] = 255  # white left half
    encoded = tf.constant(encode(array, quality=100))
    full = dict(area_range=(1.0, 1.0), aspect_range=(64 / 48, 64 / 48))  # the whole image
    flips = []
    for i in range(20):
        image = data.preprocess_for_train(encoded, tf.constant([0, i], tf.int64), 32,
                                          augment=data.Augment(**full)).numpy()
        flips.append(image[:, :8].mean() < image[:, -8:].mean())
        assert image[:, :8].mean() != pytest.approx(image[:, -8:].mean())
    assert 0 < sum(flips) < 20  # both ways over 20 seeds
    unflipped = [data.preprocess_for_train(encoded, tf.constant([0, i], tf.int64), 32,
                                           augment=data.Augment(flip=False, **full)).numpy() for i in range(5)]
    assert all(u[:, :8].mean() > u[:, -8:].mean() for u in unflipped)
    white = unflipped[0][:, :8].mean(axis=(0, 1))
    np.testing.assert_allclose(white, (1 - np.array(data.MEAN_RGB)) / np.array(data.STDDEV_RGB), atol=0.05)
    assert data.preprocess_for_train(encoded, tf.constant([0, 1], tf.int64), 32, dtype="float16").dtype == tf.float16


def test_a_grayscale_jpeg_kept_as_it_is_comes_out_rgb():
    """The converter keeps a grayscale JPEG's bytes, as slim does: both pipelines must make
    three equal channels of it."""
    gray = smooth_image(48, 40, 2)[:, :, 0]
    encoded = tf.constant(encode(gray, quality=95))
    pixels = [data.preprocess_for_eval(encoded, 32).numpy(),
              data.preprocess_for_train(encoded, tf.constant([0, 1], tf.int64), 32).numpy()]
    for image in pixels:
        assert image.shape == (32, 32, 3)
        raw = image * np.array(data.STDDEV_RGB) + np.array(data.MEAN_RGB)  # back to 0..1, channel by channel
        np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-5)
        np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)


# ------------------------------------------------------------------ coverage and sharding

@pytest.mark.parametrize("shards", [3, 4])
def test_eval_yields_every_record_once_for_uneven_shards(tmp_path, shards):
    src = class_tree(str(tmp_path / "src"), [1, 1], [3, 4])  # 7 validation images
    out = str(tmp_path / "out")
    convert_dataset(src, out, validation_shards=shards, workers=1, progress=False)
    every = sorted(f"{c}_{i}.jpg" for c, n in enumerate([3, 4]) for i in range(n))  # bare names, as slim's
    for workers in (1, shards - 1):
        seen, batches = [], []
        for w in range(workers):
            for x, y, f in data.eval_dataset(out, 2, 32, num_workers=workers, worker_index=w, with_filenames=True):
                batches.append(int(x.shape[0]))
                names = [n.decode() for n in f.numpy()]
                assert [int(n.split("_")[0]) for n in names] == y.numpy().tolist()
                seen.extend(names)
        assert sorted(seen) == every, (shards, workers)
        assert sum(batches) == 7


@pytest.mark.parametrize("train_shards", [1, 4])
def test_train_workers_read_disjoint_shares(tmp_path, train_shards):
    src = class_tree(str(tmp_path / "src"), [1] * 12, [1])  # one image per class: the label names it
    out = str(tmp_path / "out")
    convert_dataset(src, out, train_shards=train_shards, workers=1, progress=False)
    shares = []
    for w in range(2):
        ds = data.train_dataset(out, 1, 32, num_workers=2, worker_index=w, repeat=False, seed=5)
        shares.append([int(y) for _, y in ds.unbatch()])
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(12))
    assert abs(len(shares[0]) - len(shares[1])) <= 3


def test_train_dataset_repeats_and_drops_the_remainder(tmp_path):
    src = class_tree(str(tmp_path / "src"), [3, 2], [1])
    out = str(tmp_path / "out")
    convert_dataset(src, out, workers=1, progress=False)
    assert [int(y.shape[0]) for _, y in data.train_dataset(out, 2, 32, repeat=False, seed=0)] == [2, 2]
    batches = [y.numpy().tolist() for _, y in data.train_dataset(out, 4, 32, seed=0, shuffle_buffer=5).take(5)]
    assert [len(b) for b in batches] == [4] * 5  # 20 images out of 5: repeated
    assert {label for b in batches for label in b} == {0, 1}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stream_started_at_a_record_continues_exactly_where_it_stopped(tmp_path, workers):
    """What resume relies on: from ``start_record`` on, the batches (images and labels) are
    those of a stream that was never stopped, across epoch boundaries, for every worker."""
    src = class_tree(str(tmp_path / "src"), [4, 3, 4], [1])  # 11 images: an epoch ends inside a batch
    out = str(tmp_path / "out")
    convert_dataset(src, out, train_shards=3, workers=1, progress=False)
    info = data.dataset_info(out)
    for w in range(workers):
        def stream(start=0, w=w):
            ds = data.train_dataset(info, 3, 32, seed=7, shuffle_buffer=4, num_workers=workers, worker_index=w,
                                    start_record=start)
            return [(x.numpy(), y.numpy()) for x, y in ds.take(12 - start // 3)]

        whole = stream()
        assert len({tuple(y) for _, y in whole}) > 1  # it does shuffle
        for batches_done in (1, 4, 9):
            resumed = stream(batches_done * 3)
            assert len(resumed) == len(whole) - batches_done
            for (xa, ya), (xb, yb) in zip(whole[batches_done:], resumed):
                np.testing.assert_array_equal(ya, yb)
                np.testing.assert_array_equal(xa, xb)

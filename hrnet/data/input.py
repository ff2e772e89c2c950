"""tf.data input pipelines for training and evaluation, from our records or slim's.

Small pure preprocessing functions (parse, crop window, fused decode-and-crop, resize,
flip, normalize) composed in one visible chain each for train and eval. Randomness is
stateless and seeded per image (from its position in the stream), so a seeded pipeline
is deterministic however many threads run it.
"""
import logging
import numbers
import os
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from hrnet import storage
from hrnet.compat import data_options
from hrnet.data import schema
from hrnet.errors import HrnetError, IncompleteError
from hrnet.manifest import MANIFEST, read_manifest

log = logging.getLogger(__name__)

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
# Official HRNet / torchvision recipe: RandomResizedCrop ranges; eval resizes the shorter
# side to 256 and center-crops 224 (224 / 256 = 0.875).
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_RATIO = 0.875
DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}
AUTOTUNE = tf.data.experimental.AUTOTUNE


# --------------------------------------------------------------------------------------
# What a data set folder holds
# --------------------------------------------------------------------------------------

@dataclass
class DatasetInfo:
    """A data set folder: classes, label offset, and record counts and files per split."""

    data_dir: str
    num_classes: int
    label_offset: int
    class_names: List[str]  # synset or folder name, by 0-based label
    class_texts: List[str]  # readable names
    counts: Dict[str, int]  # records per split
    files: Dict[str, List[str]]  # shard paths per split
    counts_per_class: Dict[str, Dict[str, int]] = field(default_factory=dict)
    manifest: Optional[Dict[str, Any]] = None  # None for records made by slim's script

    def num_examples(self, split: str) -> int:
        return self.counts.get(split, 0)


def count_records(path: str) -> int:
    """Records in a TFRecord file, read from the length headers alone (seeks past the data)."""
    n = 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while f.tell() < size:
            header = f.read(12)
            if len(header) < 12:
                raise HrnetError(f"{path} is truncated (a partial record header at byte {f.tell()})")
            length = struct.unpack("<Q", header[:8])[0]
            f.seek(length + 4, os.SEEK_CUR)
            n += 1
        if n and f.tell() > size:
            raise HrnetError(f"{path} is truncated (its last record ends past the end of the file)")
    return n


def dataset_info(data_dir: str, num_classes: Optional[int] = None, label_offset: Optional[int] = None,
                 count: bool = True, verify: bool = False, splits: Optional[Sequence[str]] = None) -> DatasetInfo:
    """Read a data set folder (path or URI) made by ``hrnet convert``, or by slim's
    build_imagenet_data.py when the caller gives ``num_classes`` and ``label_offset``
    (ImageNet from slim: 1000 and 1). Counts of slim records come from the shard headers
    (``count=False`` leaves them 0). Shards are checked against the manifest before
    anything reads them: their sizes always, their sha256 with ``verify`` (a remote data
    set was hashed as it was downloaded). ``data_dir`` may be a reference to the records
    (hrnet.data.reference); with ``splits`` only those splits are fetched, checked and listed
    in ``files``."""
    from hrnet.data import reference

    local = reference.stage(data_dir, splits)
    if not os.path.isdir(local):
        raise FileNotFoundError(f"no such data set folder: {data_dir}")
    if os.path.exists(os.path.join(local, MANIFEST)):
        manifest = read_manifest(local, kind="tfrecords")
        for name, given, stored in (("num_classes", num_classes, manifest["num_classes"]),
                                    ("label_offset", label_offset, manifest["label_offset"])):
            if given is not None and given != stored:
                raise HrnetError(f"{name}={given} given, but {os.path.join(data_dir, MANIFEST)} says {stored}")
        files = {}
        for split, shards in manifest["shards"].items():
            if splits is not None and split not in splits:
                continue
            files[split] = [os.path.join(local, s["path"]) for s in shards]
            missing = [f for f in files[split] if not os.path.exists(f)]
            if missing:
                raise HrnetError("{} lists shards that are missing: {}".format(MANIFEST, ", ".join(missing[:3])))
            for path, shard in zip(files[split], shards):
                _check_shard(data_dir, path, shard, verify)
        rows = _label_rows(local)
        names = [r[1] for r in rows] if rows else list(manifest["classes"])
        texts = [r[2] for r in rows] if rows else list(names)
        return DatasetInfo(local, manifest["num_classes"], manifest["label_offset"], names, texts,
                           dict(manifest["counts"]), files, manifest.get("counts_per_class", {}), manifest)

    unfinished = [n for n in (".convert", storage.OWNER_FILE) if os.path.exists(os.path.join(local, n))]
    if unfinished or any(n.startswith(".tmp-") for n in os.listdir(local)):
        raise IncompleteError(f"{data_dir} holds an unfinished `hrnet convert` (no {MANIFEST}, but its "
                              f"{unfinished[0] if unfinished else 'temporary shards'} are there): run the same "
                              "convert again to finish it")
    files = {split: schema.shard_files(local, split) for split in schema.SPLITS if splits is None or split in splits}
    if not any(files.values()):
        raise HrnetError(f"{data_dir} holds neither a manifest.json nor train-*/validation-* TFRecord shards")
    rows = _label_rows(local)
    if num_classes is None and rows:
        num_classes = len(rows)
    if num_classes is None or label_offset is None:
        raise HrnetError(f"{data_dir} has no manifest.json (records made by slim's script?): give num_classes and "
                         "label_offset (slim's ImageNet: 1000 and 1)")
    _check_labels(data_dir, [f for fs in files.values() for f in fs[:1]], num_classes, label_offset)
    if rows:
        names, texts = [r[1] for r in rows], [r[2] for r in rows]
    else:
        names, texts = class_names_from_records([f for fs in files.values() for f in fs], num_classes, label_offset)
    counts = {split: sum(count_records(f) for f in fs) if count else 0 for split, fs in files.items() if fs}
    return DatasetInfo(local, num_classes, label_offset, names, texts, counts,
                       {s: f for s, f in files.items() if f})


def _check_shard(data_dir: str, path: str, shard: Dict[str, Any], verify: bool) -> None:
    size = os.path.getsize(path)
    if "bytes" in shard and size != shard["bytes"]:
        raise HrnetError(f"{path} is {size} bytes but {MANIFEST} says {shard['bytes']}: the shard is truncated or was "
                         f"changed; convert {data_dir} again (or fetch it again)")
    if verify and shard.get("sha256"):
        from hrnet.fileio import file_digest

        if file_digest(path) != shard["sha256"]:
            raise HrnetError(f"{path} does not match its sha256 in {MANIFEST}: the shard is corrupt; convert "
                             f"{data_dir} again (or fetch it again)")


def locate_corrupt_record(files: Sequence[str]) -> Optional[str]:
    """'<shard>: record N ...' for the first record of ``files`` whose length or CRC is bad,
    or None. Slow (reads everything): for the error path, after TF reported corrupt data
    without saying where."""
    for path in files:
        index = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                index += 1
        except tf.errors.DataLossError as e:
            return f"{path}: record {index} (counting from 0) is corrupt ({e.message.splitlines()[0][:120]})"
    return None


def _check_labels(data_dir: str, files: List[str], num_classes: int, label_offset: int, sample: int = 256) -> None:
    """Labels of the first records against num_classes / label_offset: a wrong offset for
    slim's records fails here, clearly, instead of deep inside the loss later."""
    spec = {schema.LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}
    labels = [int(tf.io.parse_single_example(r, spec)[schema.LABEL])
              for r in tf.data.TFRecordDataset(files).take(sample)]
    if labels and not label_offset <= min(labels) <= max(labels) < num_classes + label_offset:
        raise HrnetError(f"{data_dir}: records hold labels {min(labels)}..{max(labels)}, outside "
                         f"{label_offset}..{num_classes + label_offset - 1} (num_classes={num_classes}, "
                         f"label_offset={label_offset}); slim's ImageNet records need label_offset=1")


def class_names_from_records(files: Sequence[str], num_classes: int, label_offset: int,
                             limit: int = 50_000) -> Tuple[List[str], List[str]]:
    """(synsets, texts) by 0-based label, from the ``image/class/synset`` and ``text`` every
    slim record carries: records are read until every class was seen (slim shuffles, so
    ImageNet's 1000 take some 7,500 records) or ``limit`` records; a class never seen is
    named by its label."""
    spec = {schema.LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
            schema.SYNSET: tf.io.FixedLenFeature([], tf.string, default_value=""),
            schema.TEXT: tf.io.FixedLenFeature([], tf.string, default_value="")}
    names: Dict[int, Tuple[str, str]] = {}
    records = tf.data.TFRecordDataset(list(files)).take(limit).batch(1024)
    for batch in records.map(lambda r: tf.io.parse_example(r, spec)):
        for label, synset, text in zip(batch[schema.LABEL].numpy(), batch[schema.SYNSET].numpy(),
                                       batch[schema.TEXT].numpy()):
            index = int(label) - label_offset
            if 0 <= index < num_classes and index not in names and synset:
                names[index] = (synset.decode("utf-8", "replace"), text.decode("utf-8", "replace"))
        if len(names) == num_classes:
            break
    if len(names) < num_classes:
        log.info("%d of %d classes have no synset in the records read: they are named by their label",
                 num_classes - len(names), num_classes)
    synsets = [names.get(i, (str(i), ""))[0] for i in range(num_classes)]
    texts = [names.get(i, ("", str(i)))[1] or synsets[i] for i in range(num_classes)]
    return synsets, texts


def _label_rows(local: str) -> List[List[str]]:
    path = os.path.join(local, schema.LABELS_FILE)
    return schema.parse_labels_file(path) if os.path.exists(path) else []


def _files_and_offset(data: Union[str, DatasetInfo], split: str, label_offset: Optional[int],
                      num_classes: Optional[int]):
    """Shard files of a split and the label offset, from a DatasetInfo or a folder."""
    if not isinstance(data, DatasetInfo):
        from hrnet.data import reference

        local = reference.stage(data, (split,))
        if os.path.exists(os.path.join(local, MANIFEST)):
            data = dataset_info(local, num_classes=num_classes, label_offset=label_offset, splits=(split,))
        elif label_offset is None:
            raise HrnetError(f"{data} has no manifest.json (records made by slim's script?): give label_offset "
                             "(slim's ImageNet: 1)")
        elif num_classes is not None:  # slim's records, checked against what the caller says
            data = dataset_info(local, num_classes=num_classes, label_offset=label_offset, count=False,
                                splits=(split,))
        else:
            files = schema.shard_files(local, split)
            if not files:
                raise HrnetError(f"no {split}-* shards in {data}")
            return files, label_offset
    files = data.files.get(split) or []
    if not files:
        raise HrnetError(f"the data set in {data.data_dir} has no {split} shards")
    return files, data.label_offset


# --------------------------------------------------------------------------------------
# Pure preprocessing functions
# --------------------------------------------------------------------------------------

def _hw(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, numbers.Integral):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def parse_record(serialized, label_offset: int = 0) -> Dict[str, tf.Tensor]:
    """A serialized slim-style Example -> encoded JPEG, 0-based int32 label, file name and
    boxes [N, 4] as (ymin, xmin, ymax, xmax), the order TF's box ops use."""
    features = tf.io.parse_single_example(serialized, schema.feature_spec())
    boxes = tf.stack([tf.sparse.to_dense(features[k]) for k in
                      (schema.BBOX_YMIN, schema.BBOX_XMIN, schema.BBOX_YMAX, schema.BBOX_XMAX)], axis=-1)
    return {
        "encoded": features[schema.ENCODED],
        "label": tf.cast(features[schema.LABEL], tf.int32) - label_offset,
        "filename": features[schema.FILENAME],
        "boxes": boxes,
    }


def distorted_crop_window(image_shape, seed, boxes=None, area_range=AREA_RANGE,
                          aspect_range=ASPECT_RATIO_RANGE, min_object_covered: float = 0.1,
                          max_attempts: int = 10):
    """[offset_y, offset_x, height, width] of a random crop (RandomResizedCrop's ranges).

    With ``boxes`` [N, 4] the crop must cover ``min_object_covered`` of one of them (the
    Inception recipe); without boxes, or when a record has none, the whole image counts.
    """
    whole = tf.constant([[0.0, 0.0, 1.0, 1.0]])
    if boxes is None:
        boxes, min_object_covered = whole, 0.0
    else:
        boxes = tf.cond(tf.shape(boxes)[0] > 0, lambda: tf.cast(boxes, tf.float32), lambda: whole)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, bounding_boxes=boxes[tf.newaxis], seed=seed, min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_range, area_range=area_range, max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(image_shape, image_size, crop_ratio: float = CROP_RATIO):
    """[offset_y, offset_x, height, width] of the center crop that, resized to image_size,
    equals resizing the shorter side to size / crop_ratio and center-cropping size."""
    out_h, out_w = _hw(image_size)
    h = tf.cast(image_shape[0], tf.float32)
    w = tf.cast(image_shape[1], tf.float32)
    scale = tf.maximum(out_h / (crop_ratio * h), out_w / (crop_ratio * w))  # output px per source px
    crop_h = tf.minimum(tf.cast(tf.round(out_h / scale), tf.int32), tf.cast(image_shape[0], tf.int32))
    crop_w = tf.minimum(tf.cast(tf.round(out_w / scale), tf.int32), tf.cast(image_shape[1], tf.int32))
    crop_h, crop_w = tf.maximum(crop_h, 1), tf.maximum(crop_w, 1)
    offset_y = (tf.cast(image_shape[0], tf.int32) - crop_h + 1) // 2
    offset_x = (tf.cast(image_shape[1], tf.int32) - crop_w + 1) // 2
    return tf.stack([offset_y, offset_x, crop_h, crop_w])


def decode_and_random_crop(encoded, seed, boxes=None, area_range=AREA_RANGE,
                           aspect_range=ASPECT_RATIO_RANGE, min_object_covered: float = 0.1):
    """Decode only a random crop window of a JPEG (uint8 [h, w, 3])."""
    shape = tf.image.extract_jpeg_shape(encoded)
    window = distorted_crop_window(shape, seed, boxes, area_range, aspect_range, min_object_covered)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)


def decode_and_center_crop(encoded, image_size, crop_ratio: float = CROP_RATIO):
    """Decode the center crop of an image (uint8 [h, w, 3]); only the window of a JPEG is
    decoded, PNG / BMP / GIF are decoded whole (the export signature accepts them too)."""

    def jpeg():
        window = center_crop_window(tf.image.extract_jpeg_shape(encoded), image_size, crop_ratio)
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        window = center_crop_window(tf.shape(image), image_size, crop_ratio)
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def resize(image, image_size, antialias: bool = False):
    """Bilinear resize to image_size (float32, 0..255)."""
    return tf.image.resize(image, _hw(image_size), method="bilinear", antialias=antialias)


def normalize(image, dtype=tf.float32):
    """0..255 RGB -> (x / 255 - mean) / std, the official normalization, as ``dtype``."""
    image = (tf.cast(image, tf.float32) / 255.0 - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)
    return tf.cast(image, _dtype(dtype))


def _dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError("dtype must be one of {}, got {!r}".format(", ".join(DTYPES), dtype))
        return DTYPES[dtype]
    return tf.as_dtype(dtype)


def preprocess_for_train(encoded, seed, image_size, boxes=None, flip: bool = True, area_range=AREA_RANGE,
                         aspect_range=ASPECT_RATIO_RANGE, min_object_covered: float = 0.1,
                         dtype=tf.float32):
    """Encoded JPEG -> random-resized-cropped, maybe flipped, normalized image [h, w, 3].
    ``seed``: shape [2] int, the image's own stateless seed."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = decode_and_random_crop(encoded, crop_seed, boxes, area_range, aspect_range, min_object_covered)
    image = resize(image, image_size)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = normalize(image, dtype)
    image.set_shape(_hw(image_size) + (3,))
    return image


def preprocess_for_eval(encoded, image_size, crop_ratio: float = CROP_RATIO, dtype=tf.float32):
    """Encoded image bytes -> normalized eval image [h, w, 3]: the shorter side resized to
    size / crop_ratio, then the center crop (fused: only the window is decoded and resized).
    The export's serving signature uses this function too."""
    image = decode_and_center_crop(encoded, image_size, crop_ratio)
    # Antialiasing as PIL's resize (what the official evaluation uses) does when shrinking.
    image = resize(image, image_size, antialias=True)
    image = normalize(image, dtype)
    image.set_shape(_hw(image_size) + (3,))
    return image


# --------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------

def _check_sharding(num_workers: int, worker_index: int) -> None:
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must be in 0..num_workers-1, got {worker_index} of {num_workers}")


def train_dataset(data: Union[str, DatasetInfo], batch_size: int, image_size=224, *, split: str = "train",
                  num_workers: int = 1, worker_index: int = 0, area_range=AREA_RANGE,
                  aspect_range=ASPECT_RATIO_RANGE, use_boxes: bool = False, min_object_covered: float = 0.1,
                  flip: bool = True, dtype="float32", label_offset: Optional[int] = None,
                  num_classes: Optional[int] = None, seed: Optional[int] = None,
                  shuffle_buffer: int = 10000, repeat: bool = True, cycle_length: int = 16,
                  private_threads: int = 0, start_record: int = 0) -> tf.data.Dataset:
    """Batches (images [B, h, w, 3] normalized as ``dtype``, labels [B] int32 0-based) for training.

    ``data``: a data set folder / URI or a DatasetInfo. Each of ``num_workers`` processes
    reads its own share of the shard files (or, with fewer files than workers, of the
    records in each file). ``seed`` makes the whole stream deterministic; without it the
    pipeline trades order for speed. ``flip=False`` for data where mirroring changes the
    meaning (digits). ``use_boxes`` crops around the records' bounding boxes.

    Every epoch is shuffled with seeds derived from ``seed`` and the epoch number alone,
    and every image's crop and flip from its position in the stream, so the stream needs
    no state to be resumed: ``start_record`` (records this worker consumed before) starts
    it exactly where a killed run stopped, reading but not decoding at most one epoch.
    """
    _check_sharding(num_workers, worker_index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
        raise ValueError(f"area_range must satisfy 0 < min <= max <= 1, got {tuple(area_range)!r}")
    if not 0.0 < aspect_range[0] <= aspect_range[1]:
        raise ValueError(f"aspect_range must satisfy 0 < min <= max, got {tuple(aspect_range)!r}")
    out_dtype = _dtype(dtype)
    files, offset = _files_and_offset(data, split, label_offset, num_classes)
    deterministic = seed is not None
    base_seed = seed if deterministic else random.SystemRandom().randrange(2 ** 31)
    base_seed = (base_seed * 1009 + worker_index) % (2 ** 31)
    per_file_shard = num_workers > 1 and len(files) < num_workers

    def read_file(path):
        records = tf.data.TFRecordDataset(path, buffer_size=8 << 20)
        # Too few files to hand out: every worker reads all of them, keeping its own records.
        return records.shard(num_workers, worker_index) if per_file_shard else records

    def parse_and_preprocess(index, serialized):
        record = parse_record(serialized, offset)
        image_seed = tf.stack([tf.constant(base_seed, tf.int64), index])
        image = preprocess_for_train(record["encoded"], image_seed, image_size,
                                     record["boxes"] if use_boxes else None, flip, area_range,
                                     aspect_range, min_object_covered, out_dtype)
        return image, record["label"]

    # This worker's files: every num_workers-th one.
    own_files = files[worker_index::num_workers] if num_workers > 1 and not per_file_shard else files
    first_epoch, skip = 0, start_record
    if start_record and repeat:
        first_epoch, skip = divmod(start_record, _worker_records(data, own_files, num_workers, worker_index,
                                                                 per_file_shard))

    def epoch_records(epoch):
        # The shuffles' seeds are tensors (they depend on the epoch); TF cannot combine a tensor
        # op seed with a global seed (tf.random.set_seed), so this function's graph has none:
        # the order depends on ``seed`` and the epoch alone.
        tf.compat.v1.get_default_graph().seed = None
        epoch_seed = tf.constant(base_seed, tf.int64) * 1000003 + epoch
        records = tf.data.Dataset.from_tensor_slices(own_files)
        records = records.shuffle(len(own_files), seed=epoch_seed, reshuffle_each_iteration=False)
        records = records.interleave(read_file, cycle_length=max(1, min(cycle_length, len(own_files))),
                                     num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        records = records.shuffle(shuffle_buffer, seed=epoch_seed + 1, reshuffle_each_iteration=False)
        # The position (epoch, index) seeds each image's random crop and flip.
        return records.enumerate(start=epoch * (1 << 32))

    epochs = tf.data.Dataset.range(first_epoch, (1 << 31) if repeat else first_epoch + 1)
    dataset = epochs.flat_map(epoch_records).skip(skip)
    dataset = dataset.map(parse_and_preprocess, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.prefetch(AUTOTUNE)
    return dataset.with_options(data_options(deterministic, private_threads))


def _worker_records(data, own_files: List[str], num_workers: int, worker_index: int, per_file_shard: bool) -> int:
    """Records in one epoch of this worker's stream (from the manifest, or the shard headers)."""
    listed = {}
    if isinstance(data, DatasetInfo) and data.manifest:
        for shards in data.manifest.get("shards", {}).values():
            listed.update({os.path.join(data.data_dir, s["path"]): s["records"] for s in shards if "records" in s})
    total = 0
    for path in own_files:
        n = listed[path] if path in listed else count_records(path)
        total += len(range(worker_index, n, num_workers)) if per_file_shard else n
    if total < 1:
        raise HrnetError(f"worker {worker_index} of {num_workers} has no training records")
    return total


def eval_dataset(data: Union[str, DatasetInfo], batch_size: int, image_size=224, *, split: str = "validation",
                 crop_ratio: float = CROP_RATIO, dtype="float32", label_offset: Optional[int] = None,
                 num_classes: Optional[int] = None,
                 num_workers: int = 1, worker_index: int = 0, with_filenames: bool = False,
                 cycle_length: int = 16, private_threads: int = 0) -> tf.data.Dataset:
    """Batches (images, labels[, filenames]) of every record of ``split`` exactly once, in
    a fixed order, the last batch partial. With ``num_workers`` > 1, each worker gets
    every num_workers-th record: together they see each record once."""
    _check_sharding(num_workers, worker_index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    out_dtype = _dtype(dtype)
    files, offset = _files_and_offset(data, split, label_offset, num_classes)

    def parse_and_preprocess(serialized):
        record = parse_record(serialized, offset)
        image = preprocess_for_eval(record["encoded"], image_size, crop_ratio, out_dtype)
        if with_filenames:
            return image, record["label"], record["filename"]
        return image, record["label"]

    dataset = tf.data.Dataset.from_tensor_slices(sorted(files))
    dataset = dataset.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
                                 cycle_length=max(1, min(cycle_length, len(files))),
                                 num_parallel_calls=AUTOTUNE, deterministic=True)
    if num_workers > 1:
        dataset = dataset.shard(num_workers, worker_index)
    dataset = dataset.map(parse_and_preprocess, num_parallel_calls=AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=False)
    dataset = dataset.prefetch(AUTOTUNE)
    return dataset.with_options(data_options(True, private_threads))

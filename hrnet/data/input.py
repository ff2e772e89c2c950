"""tf.data input pipelines for training and evaluation, from our records or slim's (the
folder and its checks: hrnet.data.folder).

Small pure preprocessing functions (parse, crop window, fused decode-and-crop, flip,
resize, normalize) composed in one visible chain each for train and eval. Randomness is
stateless and seeded per image (from its position in the stream), so a seeded pipeline
is deterministic however many threads run it.
"""
import numbers
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from hrnet.compat import data_options
from hrnet.data import schema
from hrnet.data.augment import AREA_RANGE, ASPECT_RATIO_RANGE, Augment
from hrnet.data.folder import DatasetInfo, files_and_offset, worker_records
from hrnet.data.stream import LocalShards, Shard, ShardStream, private_dir

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
# The official HRNet / torchvision evaluation: the shorter side resized to 256, then the
# center 224 (224 / 256 = 0.875). Training's recipe: hrnet.data.augment.
CROP_RATIO = 0.875
# normalize's (x / 255 - mean) / std as (x - 255 mean) * 1 / (255 std): two ops instead of three.
_MEAN_255 = np.float32(255.0) * np.float32(MEAN_RGB)
_INV_STDDEV_255 = np.float32(1.0) / (np.float32(255.0) * np.float32(STDDEV_RGB))
DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}
AUTOTUNE = tf.data.experimental.AUTOTUNE
# Records read ahead of a streamed split's one-thread interleave, so that its reading runs
# beside the shuffle and the decoding rather than in turn with them.
PREFETCH_RECORDS = 1024


# --------------------------------------------------------------------------------------
# Pure preprocessing functions
# --------------------------------------------------------------------------------------

def _hw(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, numbers.Integral):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def parse_record(serialized, label_offset: int = 0, boxes: bool = True, filename: bool = True) -> Dict[str, tf.Tensor]:
    """A serialized slim-style Example -> encoded JPEG, 0-based int32 label and, unless
    switched off (training needs neither, and the box lists cost four sparse tensors per
    record), file name and boxes [N, 4] as (ymin, xmin, ymax, xmax), the order TF's box ops
    use."""
    coordinates = (schema.BBOX_YMIN, schema.BBOX_XMIN, schema.BBOX_YMAX, schema.BBOX_XMAX)
    spec = {k: v for k, v in schema.feature_spec().items()
            if (boxes or k not in coordinates) and (filename or k != schema.FILENAME)}
    features = tf.io.parse_single_example(serialized, spec)
    record = {"encoded": features[schema.ENCODED],
              "label": tf.cast(features[schema.LABEL], tf.int32) - label_offset}
    if filename:
        record["filename"] = features[schema.FILENAME]
    if boxes:
        record["boxes"] = tf.stack([tf.sparse.to_dense(features[k]) for k in coordinates], axis=-1)
    return record


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
    image = tf.cast(image, tf.float32)
    width = image.shape[-2]
    if width is None:
        out = (image - _MEAN_255) * _INV_STDDEV_255
    else:
        # The same arithmetic on rows of width x 3 values: broadcasting over 3 channels is not
        # vectorized, over a row it is (a third of the time, the most expensive step after
        # decoding in the train pipeline).
        rows = tf.reshape(image, [-1, width * 3])
        out = (rows - np.tile(_MEAN_255, width)) * np.tile(_INV_STDDEV_255, width)
        out = tf.reshape(out, tf.shape(image))
        out.set_shape(image.shape)
    return tf.cast(out, _dtype(dtype))


def _dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError("dtype must be one of {}, got {!r}".format(", ".join(DTYPES), dtype))
        return DTYPES[dtype]
    return tf.as_dtype(dtype)


def preprocess_for_train(encoded, seed, image_size, boxes=None, augment: Augment = Augment(), dtype=tf.float32):
    """Encoded JPEG -> random-resized-cropped, maybe flipped, normalized image [h, w, 3].
    ``seed``: shape [2] int, the image's own stateless seed; ``boxes`` are used only when
    ``augment.use_boxes``."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = decode_and_random_crop(encoded, crop_seed, boxes if augment.use_boxes else None, augment.area_range,
                                   augment.aspect_range, augment.min_object_covered)
    if augment.flip:
        # Flipping, then resizing, is resizing, then flipping (the bilinear grid is symmetric,
        # up to float rounding), on the uint8 crop: fewer bytes than the float32 output.
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = resize(image, image_size)
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

def file_order(n: int, seed: int, epoch: int) -> List[int]:
    """The order in which one epoch reads a worker's ``n`` shard files: a permutation drawn
    from the worker's seed and the epoch alone (numpy's PCG64), decided in Python so that a
    ShardStream can fetch the files in the order they will be read."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def _shards(data, split: str, files: List[str], order, open_files: int, first_epoch: int = 0,
            epochs: Optional[int] = None, data_cache: int = 0):
    """Where the pipeline's shard files come from: the local folder, or (a DatasetInfo whose
    shards are ``remote``) a ShardStream of at most ``data_cache`` bytes."""
    if not isinstance(data, DatasetInfo) or not data.remote:
        return LocalShards(files, order)
    listed = {os.path.join(data.data_dir, s["path"]): s for s in data.manifest["shards"][split]}
    shards = [Shard(listed[f]["path"], int(listed[f]["bytes"]), listed[f]["sha256"]) for f in files]
    return ShardStream(data.remote, split, shards, private_dir(split), data_cache, order, open_files, first_epoch,
                       epochs)


def _file_stream(shards, epoch, read_file, cycle: int, deterministic: bool):
    """The records of one epoch's files, ``cycle`` files interleaved. Streamed files are read
    by one thread (``cycle`` open at a time, the bound ShardStream relies on; a parallel
    interleave opens more ahead) and released once read to the end; the order is the same."""
    files = tf.data.Dataset.from_generator(shards.epoch, args=(epoch,),
                                           output_signature=tf.TensorSpec([], tf.string))
    if not shards.streams:
        return files.interleave(read_file, cycle_length=cycle, num_parallel_calls=AUTOTUNE,
                                deterministic=deterministic)

    def release(path):
        shards.release(path.numpy())
        return b""

    def read_and_release(path):
        done = tf.data.Dataset.from_tensors(path).map(
            lambda p: tf.ensure_shape(tf.py_function(release, [p], tf.string), []))
        return read_file(path).concatenate(done.filter(lambda _: tf.constant(False)))

    return files.interleave(read_and_release, cycle_length=cycle).prefetch(PREFETCH_RECORDS)


def _check_sharding(num_workers: int, worker_index: int) -> None:
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must be in 0..num_workers-1, got {worker_index} of {num_workers}")


def train_dataset(data: Union[str, DatasetInfo], batch_size: int, image_size=224, *, split: str = "train",
                  num_workers: int = 1, worker_index: int = 0, augment: Augment = Augment(), dtype="float32",
                  label_offset: Optional[int] = None, num_classes: Optional[int] = None, seed: Optional[int] = None,
                  shuffle_buffer: int = 10000, repeat: bool = True, cycle_length: int = 16,
                  private_threads: int = 0, start_record: int = 0, data_cache: int = 0) -> tf.data.Dataset:
    """Batches (images [B, h, w, 3] normalized as ``dtype``, labels [B] int32 0-based) for training.

    ``data``: a data set folder / URI or a DatasetInfo. Each of ``num_workers`` processes
    reads its own share of the shard files (or, with fewer files than workers, of the
    records in each file). ``seed`` makes the whole stream deterministic; without it the
    pipeline trades order for speed. ``augment``: the random crop and flip (Augment).

    Every epoch is shuffled with seeds derived from ``seed`` and the epoch number alone,
    and every image's crop and flip from its position in the stream, so the stream needs
    no state to be resumed: ``start_record`` (records this worker consumed before) starts
    it exactly where a killed run stopped, reading but not decoding at most one epoch.
    ``data_cache``: bytes of local disk for the shards when ``data`` streams them (a
    DatasetInfo with ``remote``; hrnet.data.stream).
    """
    _check_sharding(num_workers, worker_index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    out_dtype = _dtype(dtype)
    files, offset = files_and_offset(data, split, label_offset, num_classes)
    deterministic = seed is not None
    base_seed = seed if deterministic else random.SystemRandom().randrange(2 ** 31)
    base_seed = (base_seed * 1009 + worker_index) % (2 ** 31)
    per_file_shard = num_workers > 1 and len(files) < num_workers

    def read_file(path):
        records = tf.data.TFRecordDataset(path, buffer_size=8 << 20)
        # Too few files to hand out: every worker reads all of them, keeping its own records.
        return records.shard(num_workers, worker_index) if per_file_shard else records

    def parse_and_preprocess(index, serialized):
        record = parse_record(serialized, offset, boxes=augment.use_boxes, filename=False)
        image_seed = tf.stack([tf.constant(base_seed, tf.int64), index])
        image = preprocess_for_train(record["encoded"], image_seed, image_size, record.get("boxes"), augment,
                                     out_dtype)
        return image, record["label"]

    # This worker's files: every num_workers-th one.
    own_files = files[worker_index::num_workers] if num_workers > 1 and not per_file_shard else files
    first_epoch, skip = 0, start_record
    if start_record and repeat:
        first_epoch, skip = divmod(start_record, worker_records(data, own_files, num_workers, worker_index,
                                                                 per_file_shard))
    cycle = max(1, min(cycle_length, len(own_files)))
    shards = _shards(data, split, own_files, lambda epoch: file_order(len(own_files), base_seed, epoch), cycle,
                     first_epoch, None if repeat else 1, data_cache)

    def epoch_records(epoch):
        # The shuffle's seed is a tensor (it depends on the epoch); TF cannot combine a tensor
        # op seed with a global seed (tf.random.set_seed), so this function's graph has none:
        # the order depends on ``seed`` and the epoch alone.
        tf.compat.v1.get_default_graph().seed = None
        epoch_seed = tf.constant(base_seed, tf.int64) * 1000003 + epoch
        records = _file_stream(shards, epoch, read_file, cycle, deterministic)
        records = records.shuffle(shuffle_buffer, seed=epoch_seed + 1, reshuffle_each_iteration=False)
        # The position (epoch, index) seeds each image's random crop and flip.
        return records.enumerate(start=epoch * (1 << 32))

    epochs = tf.data.Dataset.range(first_epoch, (1 << 31) if repeat else first_epoch + 1)
    dataset = epochs.flat_map(epoch_records).skip(skip)
    dataset = dataset.map(parse_and_preprocess, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.prefetch(AUTOTUNE)
    return dataset.with_options(data_options(deterministic, private_threads))


def eval_dataset(data: Union[str, DatasetInfo], batch_size: int, image_size=224, *, split: str = "validation",
                 crop_ratio: float = CROP_RATIO, dtype="float32", label_offset: Optional[int] = None,
                 num_classes: Optional[int] = None,
                 num_workers: int = 1, worker_index: int = 0, with_filenames: bool = False,
                 cycle_length: int = 16, private_threads: int = 0, data_cache: int = 0) -> tf.data.Dataset:
    """Batches (images, labels[, filenames]) of every record of ``split`` exactly once, in
    a fixed order, the last batch partial. With ``num_workers`` > 1, each worker gets
    every num_workers-th record: together they see each record once. ``data_cache``: as
    for train_dataset."""
    _check_sharding(num_workers, worker_index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    out_dtype = _dtype(dtype)
    files, offset = files_and_offset(data, split, label_offset, num_classes)

    def parse_and_preprocess(serialized):
        record = parse_record(serialized, offset, boxes=False, filename=with_filenames)
        image = preprocess_for_eval(record["encoded"], image_size, crop_ratio, out_dtype)
        if with_filenames:
            return image, record["label"], record["filename"]
        return image, record["label"]

    files = sorted(files)
    cycle = max(1, min(cycle_length, len(files)))
    shards = _shards(data, split, files, lambda epoch: list(range(len(files))), cycle, epochs=1, data_cache=data_cache)
    dataset = _file_stream(shards, 0, lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20), cycle, True)
    if num_workers > 1:
        dataset = dataset.shard(num_workers, worker_index)
    dataset = dataset.map(parse_and_preprocess, num_parallel_calls=AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=False)
    dataset = dataset.prefetch(AUTOTUNE)
    return dataset.with_options(data_options(True, private_threads))

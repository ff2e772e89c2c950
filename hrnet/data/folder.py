"""What a data set folder holds: its classes, label offset, and shards and counts per split,
read from the manifest of ``hrnet convert`` or from slim's records, and checked before
anything trains on them. hrnet.data.input builds the tf.data chains from what this finds.
"""
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from hrnet import storage
from hrnet.data import schema
from hrnet.data.reference import REFERENCE
from hrnet.errors import HrnetError, IncompleteError
from hrnet.manifest import MANIFEST, read_manifest

log = logging.getLogger(__name__)



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
    # The data set's URI when its shards are streamed from there (hrnet.data.stream): then
    # ``files`` name where they would be in data_dir, which holds the manifest and labels.
    remote: str = ""

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
                 count: bool = True, verify: bool = False, splits: Optional[Sequence[str]] = None,
                 remote: str = "") -> DatasetInfo:
    """Read a data set folder (path or URI) made by ``hrnet convert``, or by slim's
    build_imagenet_data.py when the caller gives ``num_classes`` and ``label_offset``
    (ImageNet from slim: 1000 and 1). Counts of slim records come from the shard headers
    (``count=False`` leaves them 0). Shards are checked against the manifest before
    anything reads them: their sizes always, their sha256 with ``verify`` (a remote data
    set was hashed as it was downloaded). ``data_dir`` is a local folder: a command stages
    remote records or a reference to them first (hrnet.data.reference.stage), once. With
    ``splits`` only those splits are checked and listed in ``files``. ``remote``: the URI
    the shards are streamed from (data_dir holds the manifest and labels only); each shard is
    checked as it arrives."""
    local = _local_folder(data_dir)
    if not os.path.isdir(local):
        raise FileNotFoundError(f"no such data set folder: {data_dir}")
    if os.path.exists(os.path.join(local, MANIFEST)):
        manifest = read_manifest(local, kind="tfrecords")
        for name, given, stored in (("num_classes", num_classes, manifest["num_classes"]),
                                    ("label_offset", label_offset, manifest["label_offset"])):
            if given is not None and given != stored:
                raise HrnetError(f"{name}={given} given, but {os.path.join(data_dir, MANIFEST)} says {stored}")
        rows = _label_rows(local)
        _check_manifest(data_dir, local, manifest, rows, splits, remote)
        files = {}
        for split, shards in manifest["shards"].items():
            if splits is not None and split not in splits:
                continue
            files[split] = [os.path.join(local, s["path"]) for s in shards]
            if remote:
                continue
            missing = [f for f in files[split] if not os.path.exists(f)]
            if missing:
                raise HrnetError("{} lists shards that are missing: {}".format(MANIFEST, ", ".join(missing[:3])))
            for path, shard in zip(files[split], shards):
                _check_shard(data_dir, path, shard, verify)
        names = [r[1] for r in rows] if rows else list(manifest["classes"])
        texts = [r[2] for r in rows] if rows else list(names)
        return DatasetInfo(local, manifest["num_classes"], manifest["label_offset"], names, texts,
                           dict(manifest["counts"]), files, manifest.get("counts_per_class", {}), manifest, remote)

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


def _check_manifest(data_dir: str, local: str, manifest: Dict[str, Any], rows: List[List[str]],
                    splits: Optional[Sequence[str]], remote: str = "") -> None:
    """The manifest agrees with itself and with the folder. Its shards carry checksums, it
    does not: an edited class count would train against all-zero targets, an edited record
    count would scale the schedule, and a shard left out of it would silently not be read."""
    where = os.path.join(data_dir, MANIFEST)
    changed = "it was changed after the conversion; convert the data set again (or fetch it again)"
    classes = manifest.get("classes")
    for what, n in (("classes", len(classes) if classes is not None else None),
                    (schema.LABELS_FILE + " rows", len(rows) if rows else None)):
        if n is not None and n != manifest["num_classes"]:
            raise HrnetError(f"{where} says num_classes {manifest['num_classes']}, but there are {n} {what}: {changed}")
    for split, shards in manifest["shards"].items():
        if splits is not None and split not in splits:
            continue
        listed = sum(shard.get("records", 0) for shard in shards)
        if all("records" in shard for shard in shards) and manifest["counts"].get(split) != listed:
            raise HrnetError(f"{where} counts {manifest['counts'].get(split)} {split} records, but its shards hold "
                             f"{listed}: {changed}")
        present = ([n for n in storage.list_files(remote) if schema.is_shard(n, split)] if remote
                   else [os.path.basename(f) for f in schema.shard_files(local, split)])
        unlisted = sorted(set(present) - {shard["path"] for shard in shards})
        if unlisted:
            raise HrnetError(f"{data_dir} holds {split} shards that {MANIFEST} does not list "
                             f"({', '.join(unlisted[:3])}): {changed}")


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


def _local_folder(data_dir: str) -> str:
    """``data_dir``, refused when it is not a local folder of records: data sets are staged
    once, by the command that reads them, not again at every layer below it."""
    if storage.is_remote(data_dir) or os.path.isfile(os.path.join(data_dir, REFERENCE)):
        raise ValueError(f"{data_dir} is not a local data set folder: stage it first (hrnet.data.reference.stage)")
    return data_dir


def files_and_offset(data: Union[str, DatasetInfo], split: str, label_offset: Optional[int],
                      num_classes: Optional[int]):
    """Shard files of a split and the label offset, from a DatasetInfo or a local folder."""
    if not isinstance(data, DatasetInfo):
        local = _local_folder(data)
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


def worker_records(data, own_files: List[str], num_workers: int, worker_index: int, per_file_shard: bool) -> int:
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

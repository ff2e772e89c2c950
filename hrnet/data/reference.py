"""A data set passed by reference, and staging only the splits a step reads.

Between pipeline steps a data set travels as a small folder (the KFP Dataset artifact)
holding ``dataset.json``: where the records are (an s3:// / minio:// prefix or a folder) and
a copy of their manifest. Every command that takes ``--data`` accepts such a folder as well
as the records themselves, so a step's pod receives a few kilobytes from KFP and fetches
only the shards it reads: training the train split, evaluation the validation split.
"""
import fcntl
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from hrnet import storage
from hrnet.data import schema
from hrnet.errors import HrnetError
from hrnet.manifest import MANIFEST

REFERENCE = "dataset.json"
KIND = "dataset-reference"


def write_reference(folder: str, records_uri: str, manifest: Optional[Dict[str, Any]] = None) -> str:
    """Write ``folder/dataset.json`` naming ``records_uri``; returns its path."""
    path = os.path.join(folder, REFERENCE)
    body = {"kind": KIND, "uri": records_uri, "manifest": manifest}
    storage.write_text(path, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def refer(records_uri: str, folder: str) -> Dict[str, Any]:
    """A reference in ``folder`` to records converted before (ours, or slim's without a
    manifest), checked to be there and, where they have a manifest, to be TFRecords."""
    manifest_uri = records_uri.rstrip("/") + "/" + MANIFEST
    manifest = None
    if storage.exists(manifest_uri):
        manifest = json.loads(storage.read_text(manifest_uri))
        if manifest.get("kind") != "tfrecords":
            raise HrnetError(f"{records_uri} holds a {manifest.get('kind')!r} output, not TFRecords")
    elif not storage.exists(records_uri):
        raise HrnetError(f"{records_uri}: there is nothing there")
    write_reference(folder, records_uri, manifest)
    return {"kind": KIND, "uri": records_uri, "manifest": manifest}


def holds_records(uri: str) -> bool:
    """Whether ``uri`` holds TFRecords (ours: a manifest.json of kind tfrecords; slim's: train- /
    validation- shards at its top) rather than an image tree to convert. Only its top level is
    listed: an image tree of a million files costs one request."""
    manifest_uri = uri.rstrip("/") + "/" + MANIFEST
    if storage.exists(manifest_uri):
        try:
            body = json.loads(storage.read_text(manifest_uri))
        except ValueError:  # someone else's manifest.json, beside their images
            body = None
        kind = body.get("kind") if isinstance(body, dict) else None
        if kind not in (None, "tfrecords", "image-folders"):  # another step's output: a checkpoint, an export
            raise HrnetError(f"{uri} holds a {kind!r} output, neither TFRecords nor an image tree")
        return kind == "tfrecords"
    try:
        names = storage.list_names(uri)
    except FileNotFoundError:
        names = []
    if not names:
        raise HrnetError(f"{uri}: there is nothing there (give an image tree to convert, or TFRecords)")
    return any(schema.is_shard(name, split) for name in names for split in schema.SPLITS)


def prepare(data_uri: str, folder: str, artifact_uri: str, datasets_uri: str = "") -> Dict[str, Any]:
    """The pipeline's data set (its prepare-data step): a reference in ``folder`` to the TFRecords
    at ``data_uri``, or to the records its image tree converts to, at ``datasets_uri`` ("":
    beside ``artifact_uri``, the step's Dataset artifact). Returns the artifact's metadata."""
    if holds_records(data_uri):
        if storage.is_remote(artifact_uri) and not storage.is_remote(data_uri):
            # A pipeline root in object storage means the steps run in pods of their own, and
            # only this one mounts the data volume (the local runner's steps share the disk).
            raise HrnetError(f"{data_uri} holds TFRecords on a volume that only the prepare-data step mounts, so "
                             "the train and evaluate pods cannot read them: copy them to object storage and give "
                             "that s3:// / minio:// URI, or give the image tree to convert")
        refer(data_uri, folder)
        return {"records": data_uri}
    from hrnet.data.convert import convert_dataset

    records = datasets_uri or storage.sibling(artifact_uri, "tfrecords")
    manifest = convert_dataset(data_uri, records)
    write_reference(folder, records, manifest)
    return dict({key: manifest[key] for key in ("num_classes", "label_offset", "counts", "num_skipped")},
                records=records)


def resolve(data: str) -> str:
    """The records' location: ``data`` itself, or the URI a reference folder names."""
    if storage.is_remote(data):
        return data
    path = os.path.join(data, REFERENCE)
    if not os.path.isfile(path):
        return data
    try:
        with open(path) as f:
            body = json.load(f)
        uri = body["uri"]
    except (ValueError, KeyError, TypeError):
        raise HrnetError(f"{path} is not a data set reference (expected {{\"kind\": \"{KIND}\", \"uri\": ...}})") \
            from None
    if body.get("kind") != KIND or not isinstance(uri, str) or not uri:
        raise HrnetError(f"{path} is not a data set reference (kind {body.get('kind')!r})")
    return uri


def stage(data: str, splits: Optional[Sequence[str]] = None, verify: bool = True) -> str:
    """A local folder with the data set at ``data`` (records or a reference to them): for
    remote records their manifest, labels file and the shards of ``splits`` only (all
    splits when None), verified against the manifest."""
    uri = resolve(data)
    if not storage.is_remote(uri):
        return storage.local_input(uri)
    wanted = tuple(f"{split}-" for split in splits) if splits is not None else None

    def include(rel: str) -> bool:
        return wanted is None or rel in (MANIFEST, schema.LABELS_FILE) or ("/" not in rel and rel.startswith(wanted))

    return storage.local_input(uri, verify=verify, include=include)


def stage_or_stream(data: str, splits: Sequence[str], verify: bool, stream: bool) -> Tuple[str, str]:
    """(local folder, URI its shards stream from, or ""). With ``stream``, remote records with
    a manifest (which gives each shard's size and sha256) have only their manifest and labels
    staged; anything else is staged whole (stage_shared)."""
    uri = resolve(data)
    if stream and storage.is_remote(uri):
        local = stage_shared(uri, (), verify)
        if os.path.exists(os.path.join(local, MANIFEST)):
            return local, uri
    return stage_shared(data, splits, verify), ""


def stage_shared(data: str, splits: Sequence[str], verify: bool) -> str:
    """stage() for the ranks of one machine, which share the cache: they take turns (a file
    lock); the first downloads and the others find the copy. ``verify``: re-hash it (rank
    0; the others check sizes: ImageNet is 150 GB)."""
    uri = resolve(data)
    if not storage.is_remote(uri):
        return storage.local_input(uri)
    lock_path = storage.cache_path(uri, reader=True).rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return stage(uri, splits, verify=verify)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

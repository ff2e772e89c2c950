"""Folders: a sync skips what is already equal, and publishes atomically: the remote
manifest.json goes first, then the data, then TF's ``checkpoint`` pointer, then the new
manifest.json last. Local-to-local copies follow the same order."""
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from hrnet.fileio import PARTIAL_SUFFIX, atomic_write, file_digest, replacing  # PARTIAL_SUFFIX: never uploaded
from hrnet.manifest import MANIFEST
from hrnet.storage import objects
from hrnet.storage.client import get_client, with_retries
from hrnet.storage.errors import BadUriError, IntegrityError, StorageError
from hrnet.storage.objects import Obj
from hrnet.storage.settings import MIB, S3Settings, settings_from_env
from hrnet.storage.uris import CONTROL_FILES, is_remote, local_path, object_key, split_uri

log = logging.getLogger("hrnet.storage")


# Uploaded after the data (a restarted trainer must never find a pointer to a checkpoint
# whose files are not there yet); manifest.json goes after everything.
POINTER_FILES = ("checkpoint",)


def _manifest_entries(manifest: Any) -> Dict[str, Tuple[int, str]]:
    """Every {path, bytes, sha256} entry anywhere in a manifest, by path."""
    found: Dict[str, Tuple[int, str]] = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and isinstance(node.get("sha256"), str) and "bytes" in node:
                found[node["path"]] = (int(node["bytes"]), node["sha256"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return found


def parse_manifest(data: bytes, where: str) -> Dict[str, Tuple[int, str]]:
    try:
        return _manifest_entries(json.loads(data.decode("utf-8")))
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{where}/{MANIFEST} is not valid JSON") from None


@dataclass
class TransferStats:
    """What a sync did: files considered, copied, skipped as equal, deleted; bytes copied."""

    files: int = 0
    transferred: int = 0
    skipped: int = 0
    deleted: int = 0
    bytes: int = 0

    def __str__(self) -> str:
        return (f"{self.files} files: {self.transferred} copied ({self.bytes / MIB:.1f} MiB), "
                f"{self.skipped} already equal, {self.deleted} deleted")


def walk(local_dir: str) -> Dict[str, str]:
    """Files under local_dir by '/'-separated relative path, our partial files left out."""
    found = {}
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(PARTIAL_SUFFIX) or (name in CONTROL_FILES and root == local_dir):
                continue
            path = os.path.join(root, name)
            found[os.path.relpath(path, local_dir).replace(os.sep, "/")] = path
    return found


def _is_pointer(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] in POINTER_FILES


def _check_local_manifest(files: Dict[str, str], local: Dict[str, Any], local_dir: str, strict: bool) -> None:
    """Local files must match the manifest they are published with (``local``: each file's
    size and sha256); ``strict``: every file it lists must be there."""
    if MANIFEST not in files:
        return
    with open(files[MANIFEST], "rb") as f:
        entries = parse_manifest(f.read(), local_dir)
    for rel, (size, sha) in entries.items():
        if rel not in local:
            if strict:
                raise IntegrityError(f"{MANIFEST} lists {rel}, which is not in {local_dir}")
        elif local[rel][:2] != (size, sha):
            raise IntegrityError(f"{files[rel]} does not match its {MANIFEST} entry ({size} bytes, sha256 {sha}): "
                                 "it changed or is corrupt")


def _ours_to_delete(s: S3Settings, uri: str, remote: Dict[str, Any], files: Dict[str, str],
                    known: Set[str]) -> List[str]:
    """The objects under ``uri`` that are not in the folder any more and that this output
    wrote: what its previous manifest listed, and what this process uploaded there or
    downloaded from there (``known``). Anything else under the prefix was put there by
    someone else and is left alone."""
    bucket, prefix = split_uri(uri)
    gone = [rel for rel in remote if rel not in files and rel != MANIFEST]
    ours = set(known)
    if gone and MANIFEST in remote:
        previous = objects.get_bytes(s, bucket, object_key(prefix, MANIFEST), uri + "/" + MANIFEST)
        ours |= set(parse_manifest(previous, uri))
    kept = [rel for rel in gone if rel not in ours]
    if kept:
        log.warning("%s: leaving %d object(s) this output did not write (%s%s)", uri, len(kept),
                    ", ".join(kept[:3]), ", ..." if len(kept) > 3 else "")
    return [rel for rel in gone if rel in ours]


def upload_dir(s: S3Settings, local_dir: str, uri: str, delete: bool, strict: bool,
                progress: Optional[bool]) -> TransferStats:
    bucket, prefix = split_uri(uri)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"no such directory: {local_dir}")
    started = time.monotonic()
    files = walk(local_dir)
    remote = objects.list_objects(s, bucket, prefix, uri)
    stats = TransferStats(files=len(files))

    local = dict(zip(files, objects.parallel(s, [lambda p=p: objects.local_sha256(p) for p in files.values()])))
    _check_local_manifest(files, local, local_dir, strict)

    def unchanged(rel):
        obj = remote.get(rel)
        return obj is not None and obj.size == local[rel][0] and \
            objects.remote_digest(s, bucket, object_key(prefix, rel), obj) == local[rel][1]

    names = [rel for rel in files if rel != MANIFEST]
    same = dict(zip(names, objects.parallel(s, [lambda r=r: unchanged(r) for r in names])))
    todo = [rel for rel in names if not same[rel]]
    known = objects.known(s, bucket, prefix)
    known.update(rel for rel in names if same[rel])
    stale = _ours_to_delete(s, uri, remote, files, known) if delete else []
    manifest_same = MANIFEST in files and unchanged(MANIFEST)
    stats.skipped = len(names) - len(todo) + int(manifest_same)
    if not todo and not stale and (manifest_same or (MANIFEST not in files and MANIFEST not in remote)):
        log.info("%s is up to date (%d files)", uri, len(files))
        return stats

    # Unpublish first: from here until the new manifest lands, readers see "incomplete".
    if MANIFEST in remote:
        objects.remove_object(s, bucket, object_key(prefix, MANIFEST))
    new_manifest = MANIFEST in files and not manifest_same
    total = sum(local[rel][0] for rel in todo) + (local[MANIFEST][0] if new_manifest else 0)
    log.info("uploading %d of %d files (%.1f MiB) from %s to %s", len(todo) + int(new_manifest), len(files),
             total / MIB, local_dir, uri)
    bar = objects.Progress(f"upload {uri}", total, progress)
    try:
        data = [rel for rel in todo if not _is_pointer(rel)]
        sizes = objects.parallel(s, [lambda r=r: objects.put_file(s, bucket, object_key(prefix, r), files[r], bar)
                                     for r in data])
        for rel in todo:
            if _is_pointer(rel):
                sizes.append(objects.put_file(s, bucket, object_key(prefix, rel), files[rel], bar))
        objects.parallel(s, [lambda r=r: objects.remove_object(s, bucket, object_key(prefix, r)) for r in stale])
        if MANIFEST in files:
            sizes.append(objects.put_file(s, bucket, object_key(prefix, MANIFEST), files[MANIFEST], bar))
    finally:
        bar.close()
    known.update(todo)
    known.difference_update(stale)
    stats.transferred, stats.bytes, stats.deleted = len(sizes), sum(sizes), len(stale)
    log.info("uploaded %s to %s: %s in %.1fs", local_dir, uri, stats, time.monotonic() - started)
    return stats


def _safe_join(local_dir: str, rel: str, uri: str) -> str:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"refusing object {rel!r} under {uri}: its name would leave the local folder")
    return os.path.join(local_dir, *parts)


def _check_remote_manifest(manifest: Optional[bytes], remote: Dict[str, Obj], uri: str) -> Dict[str, Any]:
    """The entries of the manifest at ``uri``, each checked to name an object of its size."""
    entries = parse_manifest(manifest, uri) if manifest is not None else {}
    for rel, (size, _) in entries.items():
        if rel not in remote:
            raise IntegrityError(f"{uri}/{MANIFEST} lists {rel}, but there is no such object")
        if remote[rel].size != size:
            raise IntegrityError(f"{uri}/{rel} is {remote[rel].size} bytes, but its {MANIFEST} entry says {size}")
    return entries


def download_dir(s: S3Settings, uri: str, local_dir: str, delete: bool, progress: Optional[bool],
                  remote: Optional[Dict[str, Obj]] = None, manifest: Optional[bytes] = None,
                  include: Optional[Callable[[str], bool]] = None) -> TransferStats:
    """``include``: fetch only these files; ``delete`` then removes only local files that are
    no longer at ``uri`` at all (another split's copies stay for the steps that read them)."""
    bucket, prefix = split_uri(uri)
    started = time.monotonic()
    if remote is None:
        remote = objects.list_objects(s, bucket, prefix, uri)
    if manifest is None and MANIFEST in remote:
        manifest = objects.get_bytes(s, bucket, object_key(prefix, MANIFEST), uri + "/" + MANIFEST)
    entries = _check_remote_manifest(manifest, remote, uri)
    os.makedirs(local_dir, exist_ok=True)
    # The local copy is about to change: until it is whole again it has no manifest.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(local_dir, MANIFEST))

    names = sorted(rel for rel in remote if rel != MANIFEST and (include is None or include(rel)))
    paths = {rel: _safe_join(local_dir, rel, uri) for rel in names}
    present = {_safe_join(local_dir, rel, uri) for rel in remote}

    def unchanged(rel):
        path, obj = paths[rel], remote[rel]
        if not os.path.isfile(path) or os.path.getsize(path) != obj.size:
            return False
        want = entries[rel][1] if rel in entries else objects.remote_digest(s, bucket, object_key(prefix, rel), obj)
        if want:
            return objects.local_sha256(path)[1] == want
        # A foreign object without our checksum: a single-part upload's ETag is its MD5.
        if re.fullmatch(r"[0-9a-f]{32}", obj.etag):
            return file_digest(path, "md5") == obj.etag
        return False

    same = dict(zip(names, objects.parallel(s, [lambda r=r: unchanged(r) for r in names])))
    todo = [rel for rel in names if not same[rel]]
    total = sum(remote[rel].size for rel in todo)
    if todo:
        part = ""
        if include:
            part = " ({}{}: this step reads {} of {})".format(", ".join(todo[:4]), ", ..." if len(todo) > 4 else "",
                                                               len(names), len(remote) - int(MANIFEST in remote))
        log.info("downloading %d of %d files%s (%.1f MiB) from %s to %s", len(todo), len(names), part, total / MIB,
                 uri, local_dir)
    bar = objects.Progress(f"download {uri}", total, progress)
    try:
        for rel in todo:
            os.makedirs(os.path.dirname(paths[rel]), exist_ok=True)
        sizes = objects.parallel(s, [lambda r=r: objects.get_file(s, bucket, object_key(prefix, r), paths[r],
                                                                  entries.get(r), bar, remote[r].etag)
                                     for r in todo])
    finally:
        bar.close()
    objects.known(s, bucket, prefix).update(names)
    stats = TransferStats(files=len(names) + int(manifest is not None), transferred=len(todo), bytes=sum(sizes),
                          skipped=len(names) - len(todo))
    if delete:
        keep = (present if include else set(paths.values())) | {os.path.join(local_dir, MANIFEST)}
        for path in walk(local_dir).values():
            if path not in keep:
                os.remove(path)
                stats.deleted += 1
    if manifest is not None:
        atomic_write(os.path.join(local_dir, MANIFEST), manifest)
    if todo or stats.deleted:
        log.info("downloaded %s to %s: %s in %.1fs", uri, local_dir, stats, time.monotonic() - started)
    return stats


def copy_dir(src: str, dst: str, delete: bool) -> TransferStats:
    """Local-to-local sync with the same rules (skip equal files, manifest last)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no such directory: {src}")
    if os.path.realpath(src) == os.path.realpath(dst):
        return TransferStats()
    files = walk(src)
    stats = TransferStats(files=len(files))
    os.makedirs(dst, exist_ok=True)
    # Unpublish first, as for a bucket: dst has no manifest until the new one is copied.
    old_manifest = os.path.join(dst, MANIFEST)
    same_manifest = MANIFEST in files and os.path.exists(old_manifest) and \
        objects.local_sha256(old_manifest)[:2] == objects.local_sha256(files[MANIFEST])[:2]
    if os.path.exists(old_manifest) and not same_manifest:
        os.remove(old_manifest)
    order = sorted(files, key=lambda rel: (rel == MANIFEST, _is_pointer(rel), rel))
    for rel in order:
        target = os.path.join(dst, *rel.split("/"))
        if os.path.isfile(target) and objects.local_sha256(target)[:2] == objects.local_sha256(files[rel])[:2]:
            stats.skipped += 1
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with replacing(target) as tmp:
            shutil.copy2(files[rel], tmp)
        stats.transferred += 1
        stats.bytes += os.path.getsize(target)
    if delete:
        for rel, path in walk(dst).items():
            if rel not in files:
                os.remove(path)
                stats.deleted += 1
    return stats


def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri`` (for a bare bucket: the bucket). A URI in
    a bucket that does not exist is an error (BucketNotFoundError), not False."""
    if not is_remote(uri):
        return os.path.exists(local_path(uri))
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    if not prefix:
        return bool(with_retries(s, f"check {uri}", lambda: get_client(s).bucket_exists(bucket)))
    if objects.head(s, bucket, prefix, f"check {uri}") is not None:
        return True
    client = get_client(s)

    def any_below():
        return next(iter(client.list_objects(bucket, prefix=prefix + "/")), None) is not None

    return bool(with_retries(s, f"check {uri}", any_below))


def list_files(uri: str) -> List[str]:
    """Relative paths ('/'-separated, sorted) of every file under the folder ``uri``."""
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such directory: {path}")
        return sorted(walk(path))
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    return sorted(objects.list_objects(s, bucket, prefix, uri))


def list_names(uri: str) -> List[str]:
    """The names directly under the folder ``uri`` (files and folders, sorted), without
    listing what is below them: an image tree of a million files is one request's work."""
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such directory: {path}")
        return sorted(os.listdir(path))
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    base = prefix + "/" if prefix else ""

    def go():
        names = (o.object_name[len(base):].rstrip("/")
                 for o in get_client(s).list_objects(bucket, prefix=base or None, recursive=False))
        return sorted(name for name in names if name)

    return with_retries(s, f"list {uri}", go)


def read_bytes(uri: str) -> bytes:
    """The content of a small file (whole in memory), checked against its sha256."""
    if not is_remote(uri):
        with open(local_path(uri), "rb") as f:
            return f.read()
    s = settings_from_env()
    bucket, key = split_uri(uri)
    if not key:
        raise BadUriError(f"{uri} names a bucket, not a file")
    return objects.get_bytes(s, bucket, key, uri)


def get_object(uri: str, dest: str, size: int, sha256: str) -> None:
    """Download one large object to ``dest``, checked against ``size`` and ``sha256`` (from
    a manifest) as it arrives; a partial file until it is whole."""
    s = settings_from_env()
    bucket, key = split_uri(uri)
    objects.get_file(s, bucket, key, dest, (size, sha256), objects.Progress(uri, size, False))


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small file atomically (locally: temp file and rename), with its sha256."""
    if not is_remote(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, data)
        return
    s = settings_from_env()
    bucket, key = split_uri(uri)
    if not key:
        raise BadUriError(f"{uri} names a bucket, not a file")
    objects.put_bytes(s, bucket, key, data, uri)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def upload(local_dir: str, uri: str, *, delete: bool = False, progress: Optional[bool] = None) -> TransferStats:
    """Copy a local folder to ``uri``: equal objects skipped, every object verified,
    manifest.json last; ``delete`` removes objects that are not in the local folder."""
    if not is_remote(uri):
        return copy_dir(local_path(local_dir), local_path(uri), delete)
    return upload_dir(settings_from_env(), local_path(local_dir), uri, delete, strict=False, progress=progress)


def download(uri: str, local_dir: str, *, delete: bool = False, progress: Optional[bool] = None) -> TransferStats:
    """Copy the folder ``uri`` into ``local_dir``: equal files skipped, every file verified
    (against manifest.json when there is one), manifest.json written last; ``delete``
    removes local files that are not at ``uri``."""
    if is_remote(local_dir):
        raise BadUriError(f"download needs a local destination, not {local_dir}")
    if not is_remote(uri):
        return copy_dir(local_path(uri), local_path(local_dir), delete)
    return download_dir(settings_from_env(), uri, local_path(local_dir), delete, progress)


def sync(src: str, dst: str, *, delete: bool = False, progress: Optional[bool] = None) -> TransferStats:
    """Make ``dst`` hold what ``src`` holds; either side a URI or a local path."""
    if is_remote(src) and is_remote(dst):
        with tempfile.TemporaryDirectory(prefix="hrnet-sync-") as tmp:
            download(src, tmp, progress=progress)
            return upload(tmp, dst, delete=delete, progress=progress)
    if is_remote(src):
        return download(src, dst, delete=delete, progress=progress)
    return upload(src, dst, delete=delete, progress=progress)

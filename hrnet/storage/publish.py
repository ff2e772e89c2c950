"""What steps call: a verified local copy of an input, a leased local folder for an output
that is published when the step succeeds, and the mirror / restore of checkpoints. An output
owns its location: anything else found there is refused before a byte is written."""
import contextlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from hrnet.errors import IncompleteError, with_article
from hrnet.fileio import atomic_write
from hrnet.manifest import MANIFEST
from hrnet.storage import folders, lease, objects
from hrnet.storage.errors import ChangedError, IntegrityError, ObjectNotFoundError, OwnershipError
from hrnet.storage.folders import TransferStats
from hrnet.storage.lease import Lease
from hrnet.storage.objects import Obj
from hrnet.storage.settings import S3Settings, settings_from_env
from hrnet.storage.uris import (
    CONTROL_FILES,
    OWNER_FILE,
    cache_path,
    is_control,
    is_remote,
    join,
    local_path,
    object_key,
    output_target,
    split_uri,
)

log = logging.getLogger("hrnet.storage")


def local_input(uri: str, cache_dir: Optional[str] = None, verify: bool = True,
                include: Optional[Callable[[str], bool]] = None) -> str:
    """A local folder holding the complete output at ``uri`` (its manifest.json present).

    A remote ``uri`` is copied to ``cache_path(uri, cache_dir, reader=True)``; a copy already there is
    reused when it matches the remote manifest.json and its files verify against it
    (sizes, and sha256 unless ``verify`` is False). ``include(relative path)`` limits the
    copy to the files a step reads (one split of a data set); the manifest always comes."""
    if not is_remote(uri):
        return local_path(uri)
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    dest = cache_path(uri, cache_dir, reader=True)
    remote = objects.list_objects(s, bucket, prefix, uri)
    if MANIFEST not in remote:
        if not remote:
            raise ObjectNotFoundError(f"{uri} does not exist (there are no objects under it)")
        raise IncompleteError(f"{uri} has no {MANIFEST}: it is incomplete (still being written, or its writer died); "
                              "refusing to read it")
    manifest_uri = uri + "/" + MANIFEST

    def current_manifest():
        try:
            return objects.get_bytes(s, bucket, object_key(prefix, MANIFEST), manifest_uri)
        except ObjectNotFoundError:
            return None

    def republished():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(dest, MANIFEST))
        return IncompleteError(f"{uri} is being republished (its {MANIFEST} changed while it was read); "
                               "it is incomplete until the writer finishes: run again")

    manifest = current_manifest()
    if manifest is None:
        raise republished()
    if _cache_matches(s, uri, dest, remote, manifest, verify, include):
        log.info("using the verified local copy of %s in %s", uri, dest)
        return dest
    def changed():
        # Same manifest bytes are not enough (v1 -> v2 -> v1 while we read): every object must
        # still be the version we listed, so that what we hold is one published state.
        if current_manifest() != manifest:
            return True
        now = objects.list_objects(s, bucket, prefix, uri)
        return {k: o.etag for k, o in now.items()} != {k: o.etag for k, o in remote.items()}

    try:
        folders.download_dir(s, uri, dest, delete=True, progress=None, remote=remote, manifest=manifest,
                             include=include)
    except ChangedError:
        raise republished() from None
    except (IntegrityError, ObjectNotFoundError):
        if changed():
            raise republished() from None
        raise
    if changed():
        raise republished()
    return dest


def _cache_matches(s: S3Settings, uri: str, dest: str, remote: Dict[str, Obj], manifest: bytes,
                   verify: bool, include: Optional[Callable[[str], bool]] = None) -> bool:
    path = os.path.join(dest, MANIFEST)
    try:
        with open(path, "rb") as f:
            if f.read() != manifest:
                return False
    except OSError:
        return False
    entries = folders.parse_manifest(manifest, dest)
    if include is not None:
        remote = {rel: obj for rel, obj in remote.items() if rel == MANIFEST or include(rel)}
        entries = {rel: entry for rel, entry in entries.items() if include(rel)}
    local = folders.walk(dest)
    for rel, obj in remote.items():
        if rel not in local or os.path.getsize(local[rel]) != obj.size:
            return False
    if not verify:
        return all(os.path.getsize(local[rel]) == size for rel, (size, _) in entries.items() if rel in local)
    bucket, prefix = split_uri(uri)

    def same(rel):
        if rel in entries:
            return rel in local and objects.local_sha256(local[rel])[:2] == entries[rel]
        # Not in the manifest (logs, checkpoints): the object's own checksum, when it has one.
        want = objects.remote_digest(s, bucket, object_key(prefix, rel), remote[rel])
        return want is None or objects.local_sha256(local[rel])[1] == want

    names = set(entries) | {rel for rel in remote if rel != MANIFEST}
    return all(objects.parallel(s, [lambda r=r: same(r) for r in sorted(names)]))


def _describe_foreign(names: List[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    return f"{len(names)} file{'' if len(names) == 1 else 's'} ({shown}{', ...' if len(names) > 3 else ''})"


def _check_owner(uri: str, kind: str, names: List[str], owner: Optional[Dict[str, Any]],
                 manifest: Optional[Dict[str, Any]]) -> None:
    if manifest is not None:
        found = manifest.get("kind")
        if found != kind:
            raise OwnershipError(f"{uri} already holds {with_article(found or 'foreign')} output (its {MANIFEST}), "
                                 f"not {with_article(kind)}: refusing to overwrite it; write to a new location")
        return
    if owner is not None:
        if owner.get("kind") != kind:
            raise OwnershipError(f"{uri} holds an unfinished {owner.get('kind') or 'unknown'} output, "
                                 f"not {with_article(kind)}: refusing to write into it; write to a new location")
        return
    if names:
        raise OwnershipError(f"{uri} is not empty and is not an hrnet {kind} output: it holds "
                             f"{_describe_foreign(names)}; refusing to write there, since that could delete or "
                             "overwrite them: give an empty or new location")


def claim_output(uri: str, kind: str, mark: bool = True) -> None:
    """Make sure ``uri`` is empty or already an output of ``kind`` (finished, or unfinished
    and resumable), and mark it as one (unless ``mark`` is False: only the check). Anything
    else there is refused (OwnershipError) with what it holds, before a single byte is
    written."""
    target = output_target(uri)
    marker = json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                        sort_keys=True).encode()
    if not is_remote(target):
        if not mark and not os.path.exists(target):
            return
        if os.path.exists(target) and not os.path.isdir(target):
            raise OwnershipError(f"{uri} is a file, not a folder: give a new folder for the {kind} output")
        os.makedirs(target, exist_ok=True)
        names = [n for n in os.listdir(target) if n not in CONTROL_FILES]
        owner = lease.read_json_file(os.path.join(target, OWNER_FILE))
        manifest = lease.read_json_file(os.path.join(target, MANIFEST))
        _check_owner(uri, kind, names, owner, manifest)
        if owner is None and mark:
            atomic_write(os.path.join(target, OWNER_FILE), marker)
        return
    s = settings_from_env()
    bucket, prefix = split_uri(target)
    objects.check_bucket(s, bucket, uri)
    found = objects.list_objects(s, bucket, prefix, uri, control=True)
    names = [rel for rel in found if not is_control(rel)]

    def remote_json(name):
        if name not in found:
            return None
        try:
            return json.loads(objects.get_bytes(s, bucket, object_key(prefix, name), uri + "/" + name).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, ObjectNotFoundError):
            return {}

    owner = remote_json(OWNER_FILE)
    _check_owner(uri, kind, names, owner, remote_json(MANIFEST) if MANIFEST in names else None)
    if owner is None and mark:
        folders.write_bytes(join(target, OWNER_FILE), marker)


@contextlib.contextmanager
def local_output(uri: str, kind: Optional[str] = None, cache_dir: Optional[str] = None,
                 force: bool = False) -> Iterator[str]:
    """A local folder to write an output of ``kind`` into, leased for the whole block.

    The location must be empty or already an output of the same kind (claim_output), and
    no other writer may hold it (Lease). For a remote ``uri`` the folder is uploaded when
    the block exits without error, manifest.json last; objects of an older version that
    are not in it are removed, but only those this output wrote. If the block fails
    nothing is published. The folder (``cache_path(uri, cache_dir)``) is kept between runs,
    like a local output folder, so a step that resumes from its own output (convert's
    finished shards) finds it again on the same machine.
    """
    target = output_target(uri)
    created = not is_remote(target) and not os.path.exists(target)
    if is_remote(target):  # before claim_output puts the owner's mark there
        _forget_what_the_store_lost(target, cache_path(target, cache_dir))
    if kind is not None:
        claim_output(target, kind)
    if not is_remote(target):
        os.makedirs(target, exist_ok=True)
        try:
            with Lease(target, force=force):
                yield target
        except BaseException:
            if created and all(n in CONTROL_FILES for n in os.listdir(target)):
                shutil.rmtree(target, ignore_errors=True)  # a step that failed before writing leaves nothing
            raise
        return
    s = settings_from_env()
    bucket, _ = split_uri(target)
    # Fail before the work, not after it: a missing bucket or bad credentials.
    objects.check_bucket(s, bucket, uri)
    dest = cache_path(target, cache_dir)
    os.makedirs(dest, exist_ok=True)
    # The cache folder is leased too (two processes of one machine), its lock file beside it
    # so that the folder holds exactly what is published.
    with Lease(target, force=force) as held, Lease(dest, force=force, lock_file=dest + ".lease"):
        lease.leases[target] = held
        try:
            yield dest
        except BaseException:
            log.warning("not publishing %s: the step failed (its local files stay in %s)", uri, dest)
            raise
        finally:
            lease.leases.pop(target, None)
        if not os.path.exists(os.path.join(dest, MANIFEST)):
            log.warning("%s has no %s: readers will treat %s as incomplete", dest, MANIFEST, uri)
        held.check()
        folders.upload_dir(s, dest, target, delete=True, strict=True, progress=None)


def _forget_what_the_store_lost(uri: str, dest: str) -> None:
    """The store is the truth: where it holds nothing under ``uri`` (not even an owner's mark),
    the writer's copy of an earlier output there is dropped, so that the step starts fresh
    instead of resuming from (or publishing again) what was deleted. An output that is only
    unfinished keeps its copy: its owner's mark is in the store."""
    if not os.path.isdir(dest) or not os.listdir(dest):
        return
    bucket, prefix = split_uri(uri)
    if objects.list_objects(settings_from_env(), bucket, prefix, uri, control=True):
        return
    log.info("%s holds nothing (deleted?): starting it afresh, without the local copy of its earlier content in %s",
             uri, dest)
    shutil.rmtree(dest)


def fetch(uri: str, cache_dir: Optional[str] = None) -> str:
    """A local copy of whatever is at ``uri`` now (a plain bucket of files, without a
    manifest): files deleted there are deleted from the copy, which is the readers' own."""
    if not is_remote(uri):
        return local_path(uri)
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    remote = objects.list_objects(s, bucket, prefix, uri)
    if not remote:
        raise ObjectNotFoundError(f"{uri} does not exist (there are no objects under it)")
    dest = cache_path(uri, cache_dir, reader=True)
    folders.download_dir(s, uri, dest, delete=True, progress=None, remote=remote)
    return dest


def mirror(local_dir: str, uri: str, delete: bool = False) -> TransferStats:
    """Upload what changed in ``local_dir`` to ``uri`` (no-op when uri is local_dir):
    files first, TF's ``checkpoint`` pointer after them, manifest.json last. ``delete``
    also removes objects whose local file is gone (checkpoints the trainer dropped)."""
    if not is_remote(uri):
        return folders.copy_dir(local_path(local_dir), local_path(uri), delete)
    held = lease.leases.get(output_target(uri))
    if held is not None:
        held.check()
    return folders.upload_dir(settings_from_env(), local_path(local_dir), uri, delete, strict=False, progress=None)


def restore(uri: str, local_dir: str) -> TransferStats:
    """Download what ``uri`` holds into ``local_dir`` (resume on another node); files
    already there and equal are kept. Nothing at ``uri`` is not an error: a fresh start."""
    if not is_remote(uri):
        src = local_path(uri)
        if not os.path.isdir(src):
            return TransferStats()
        return folders.copy_dir(src, local_path(local_dir), delete=False)
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    remote = objects.list_objects(s, bucket, prefix, uri)
    if not remote:
        log.info("nothing to restore from %s", uri)
        return TransferStats()
    return folders.download_dir(s, uri, local_path(local_dir), delete=False, progress=None, remote=remote)

"""One object, verified: every upload carries its sha256 and is checked after it lands, every
download is hashed as it streams; local digests are remembered while a file is unchanged."""
import contextlib
import hashlib
import io
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from minio.error import S3Error
from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

from hrnet.fileio import PARTIAL_SUFFIX, file_digest
from hrnet.storage.client import get_client, with_retries
from hrnet.storage.errors import BucketNotFoundError, ChangedError, Mismatch, ObjectNotFoundError
from hrnet.storage.settings import MIB, S3Settings
from hrnet.storage.uris import is_control

log = logging.getLogger("hrnet.storage")


SHA256_META = "x-amz-meta-sha256"
_digests: Dict[Tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()
# sha256 of remote objects we have seen, by ETag: lets a repeated mirror skip HEAD requests.
_remote_sha: Dict[Tuple[str, str, str, str], str] = {}


def local_sha256(path: str) -> Tuple[int, str, int]:
    """(bytes, sha256, mtime_ns) of a local file; remembered while the file is unchanged."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _digests_lock:
        digest = _digests.get(key)
    if digest is None:
        digest = file_digest(path)
        with _digests_lock:
            _digests[key] = digest
    return st.st_size, digest, st.st_mtime_ns


class Progress:
    """A byte-counting tqdm bar shared by the transfer threads (tqdm.update is not thread-safe)."""

    def __init__(self, desc: str, total: int, show: Optional[bool]):
        show = total >= MIB if show is None else show
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
                        file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0, leave=False)
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        if n:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Obj:
    size: int
    etag: str


def list_objects(s: S3Settings, bucket: str, prefix: str, uri: str, control: bool = False) -> Dict[str, Obj]:
    """Objects under ``prefix/`` by path relative to the prefix (the owner and lease
    objects, and lease claims, only with ``control``)."""
    base = prefix + "/" if prefix else ""
    client = get_client(s)

    def go():
        found = {}
        for obj in client.list_objects(bucket, prefix=base or None, recursive=True):
            name = obj.object_name or ""
            if obj.is_dir or name.endswith("/") or not name.startswith(base):
                continue
            rel = name[len(base):]
            if not control and is_control(rel):
                continue
            found[rel] = Obj(int(obj.size or 0), (obj.etag or "").strip('"'))
        return found

    return with_retries(s, f"list {uri}", go)


def head(s: S3Settings, bucket: str, key: str, what: str) -> Optional[Tuple[int, Optional[str], str]]:
    """(bytes, sha256 or None, etag) of an object, None when there is none."""
    client = get_client(s)

    def go():
        try:
            st = client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        return int(st.size or 0), st.metadata.get(SHA256_META), (st.etag or "").strip('"')

    return with_retries(s, what, go)


# Objects this process uploaded to or downloaded from each prefix: the ones a mirror with
# ``delete`` may remove once their local file is gone (a checkpoint the trainer dropped).
transferred: Dict[Tuple[str, str, str], set] = {}


def known(s: S3Settings, bucket: str, prefix: str) -> set:
    with _digests_lock:
        return transferred.setdefault((s.endpoint, bucket, prefix), set())


def remote_digest(s: S3Settings, bucket: str, key: str, obj: Obj) -> Optional[str]:
    memo = (s.endpoint, bucket, key, obj.etag)
    if obj.etag and memo in _remote_sha:
        return _remote_sha[memo]
    info = head(s, bucket, key, f"check s3://{bucket}/{key}")
    if info is None:
        return None
    if info[1] and info[2]:
        _remote_sha[(s.endpoint, bucket, key, info[2])] = info[1]
    # Another version than the one listed: its checksum says nothing about the listed one.
    return info[1] if not obj.etag or info[2] == obj.etag else None


def put_file(s: S3Settings, bucket: str, key: str, path: str, progress: Progress) -> int:
    """Upload one file with its sha256, then check the object; returns its size."""
    client = get_client(s)

    def go():
        size, sha, mtime = local_sha256(path)
        sent = []  # what this attempt moved the bar by, taken back if it fails

        def count(n):
            sent.append(n)
            progress.update(n)

        try:
            with open(path, "rb") as f:
                result = client.put_object(bucket, key, CallbackIOWrapper(count, f, "read"), size,
                                           metadata={"sha256": sha}, part_size=s.part_size, num_parallel_uploads=4)
        except BaseException:
            progress.update(-sum(sent))
            raise
        if os.stat(path).st_mtime_ns != mtime:
            raise Mismatch(f"{path} changed while it was uploaded")
        info = client.stat_object(bucket, key)
        got_sha = info.metadata.get(SHA256_META)
        if int(info.size or 0) != size or got_sha != sha:
            raise Mismatch(f"object is {info.size} bytes with sha256 {got_sha} after upload, "
                            f"expected {size} bytes with {sha}")
        _remote_sha[(s.endpoint, bucket, key, (result.etag or info.etag or "").strip('"'))] = sha
        return size

    return with_retries(s, f"upload s3://{bucket}/{key}", go)


def get_file(s: S3Settings, bucket: str, key: str, dest: str, expect: Optional[Tuple[int, str]],
             progress: Progress, etag: str = "") -> int:
    """Download one object to ``dest`` (via a partial file), hashed as it streams; returns its size.
    ``etag``: the version listed; another one means the object is being rewritten (ChangedError)."""
    client = get_client(s)
    tmp = dest + PARTIAL_SUFFIX

    def go():
        received = 0
        try:
            response = client.get_object(bucket, key)
            try:
                meta_sha = response.headers.get(SHA256_META)
                got_etag = (response.headers.get("ETag") or "").strip('"')
                if etag and got_etag and got_etag != etag:
                    raise ChangedError(f"s3://{bucket}/{key} changed after it was listed: it is being rewritten")
                h = hashlib.sha256()
                with open(tmp, "wb") as f:
                    for chunk in response.stream(MIB):
                        f.write(chunk)
                        h.update(chunk)
                        received += len(chunk)
                        progress.update(len(chunk))
            finally:
                response.close()
                response.release_conn()
            digest = h.hexdigest()
            want_size, want_sha = expect if expect else (int(response.headers.get("Content-Length", received)),
                                                        meta_sha)
            if received != want_size or (want_sha and digest != want_sha):
                raise Mismatch(f"received {received} bytes with sha256 {digest}, "
                                f"expected {want_size} bytes with {want_sha or '(unknown)'}")
            os.replace(tmp, dest)
        except BaseException:
            progress.update(-received)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        if got_etag:
            _remote_sha[(s.endpoint, bucket, key, got_etag)] = digest
        with _digests_lock:
            st = os.stat(dest)
            _digests[(os.path.abspath(dest), st.st_size, st.st_mtime_ns)] = digest
        return received

    return with_retries(s, f"download s3://{bucket}/{key}", go)


def get_bytes(s: S3Settings, bucket: str, key: str, uri: str) -> bytes:
    client = get_client(s)

    def go():
        response = client.get_object(bucket, key)
        try:
            data = response.read()
            meta_sha = response.headers.get(SHA256_META)
        finally:
            response.close()
            response.release_conn()
        if meta_sha and hashlib.sha256(data).hexdigest() != meta_sha:
            raise Mismatch("received data does not match the object's sha256")
        return data

    try:
        return with_retries(s, f"read {uri}", go)
    except ObjectNotFoundError:
        # With AWS_REGION set, a missing bucket answers a plain 404 too: say which it is.
        check_bucket(s, bucket, uri)
        raise


def put_bytes(s: S3Settings, bucket: str, key: str, data: bytes, uri: str) -> None:
    """Write a small object whole, with its sha256, and check it after it lands."""
    sha = hashlib.sha256(data).hexdigest()
    client = get_client(s)

    def go():
        client.put_object(bucket, key, io.BytesIO(data), len(data), metadata={"sha256": sha})
        info = client.stat_object(bucket, key)
        if int(info.size or 0) != len(data) or info.metadata.get(SHA256_META) != sha:
            raise Mismatch("the object does not match what was written")

    with_retries(s, f"write {uri}", go)


def remove_object(s: S3Settings, bucket: str, key: str) -> None:
    with_retries(s, f"delete s3://{bucket}/{key}", lambda: get_client(s).remove_object(bucket, key))


def check_bucket(s: S3Settings, bucket: str, uri: str) -> None:
    if not with_retries(s, f"open {uri}", lambda: get_client(s).bucket_exists(bucket)):
        raise BucketNotFoundError(f"{uri}: there is no bucket {bucket!r} at {s.url} (create it, or fix the URI)")


def parallel(s: S3Settings, tasks: List[Callable[[], Any]]) -> List[Any]:
    """Run tasks on s.workers threads; the first failure cancels what has not started."""
    if not tasks:
        return []
    results: List[Any] = [None] * len(tasks)
    errors: List[BaseException] = []
    with ThreadPoolExecutor(max_workers=min(s.workers, len(tasks))) as pool:
        futures = {pool.submit(task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            if future.cancelled():  # after the first failure: not a failure of its own
                continue
            try:
                results[futures[future]] = future.result()
            except BaseException as exc:
                errors.append(exc)
                for other in futures:
                    other.cancel()
    if errors:
        if len(errors) > 1:  # the ones already running when the first failed: one line, not one each
            log.error("%d more transfer(s) failed at the same time, e.g. %s", len(errors) - 1, errors[1])
        raise errors[0]
    return results

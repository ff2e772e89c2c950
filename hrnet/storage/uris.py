"""Where an output lives: URIs and local paths, the cache folder of a remote one, and the
names of the bookkeeping files at the top of every output."""
import os
import re
from typing import Optional, Tuple
from urllib.parse import quote

from hrnet.storage.errors import BadUriError
from hrnet.storage.settings import settings_from_env

REMOTE_SCHEMES = ("s3://", "minio://")
# Bookkeeping at the top of an output, never part of its data: which kind of output owns the
# prefix or folder (written before any data, so an unfinished output is still recognised as
# ours), and the lease of the writer working on it now.
OWNER_FILE = ".hrnet-output.json"
LEASE_FILE = ".hrnet-lease.json"
CONTROL_FILES = (OWNER_FILE, LEASE_FILE)
# Where writers claim the lease on stores that ignore conditional writes (storage/lease.py):
# objects that live a few requests each.
LEASE_CLAIMS = ".hrnet-lease-claims"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def is_control(rel: str) -> bool:
    """Whether a path relative to an output's top is bookkeeping rather than its data."""
    return rel in CONTROL_FILES or rel.startswith(LEASE_CLAIMS + "/")


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def _check_scheme(uri: str) -> None:
    if not isinstance(uri, str) or not uri:
        raise BadUriError(f"expected a URI or a local path, got {uri!r}")
    short = re.match(r"^(s3|minio):/?(?!/)", uri)
    if short:  # s3:/bucket would otherwise be a local folder of that name, "not found"
        raise BadUriError(f"{uri} is not a URI: write {short.group(1)}://bucket/prefix (two slashes)")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", uri)
    if match and not is_remote(uri) and match.group(1) != "file":
        raise BadUriError(f"unknown scheme {match.group(1)}:// in {uri}: use s3://bucket/prefix, "
                          "minio://bucket/prefix or a local path")


def split_uri(uri: str) -> Tuple[str, str]:
    """(bucket, prefix) of an s3:// or minio:// URI; prefix without leading/trailing '/'."""
    _check_scheme(uri)
    if not is_remote(uri):
        raise BadUriError(f"not an object-storage URI: {uri}")
    rest = uri.split("://", 1)[1]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise BadUriError(f"no bucket in {uri}: write {uri.split('://')[0]}://bucket/prefix")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise BadUriError(f"invalid bucket name {bucket!r} in {uri} (3-63 lowercase letters, digits, '.' and '-')")
    prefix = re.sub(r"/+", "/", prefix).strip("/")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise BadUriError(f"'.' and '..' are not allowed in an object prefix: {uri}")
    return bucket, prefix


def local_path(uri: str) -> str:
    _check_scheme(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def object_key(prefix: str, rel: str) -> str:
    return prefix + "/" + rel if prefix else rel


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def sibling(uri: str, name: str) -> str:
    """The location ``name`` beside ``uri`` (a URI or a path): where a pipeline step keeps
    what it writes outside its own artifact (the records, the mirrored checkpoints)."""
    return join(uri.rstrip("/").rsplit("/", 1)[0], name)


def cache_root(cache_dir: Optional[str] = None) -> str:
    """Where local copies of remote data go: HRNET_CACHE_DIR, or ~/.cache/hrnet."""
    return cache_dir or os.environ.get("HRNET_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hrnet")


def cache_path(uri: str, cache_dir: Optional[str] = None, reader: bool = False) -> str:
    """The local folder that holds the copy of ``uri`` (under HRNET_CACHE_DIR): the writer's
    working copy, or with ``reader`` the copy readers download into. They are apart so that
    a reader's download never deletes what a live writer on the same machine has not yet
    published."""
    bucket, prefix = split_uri(uri)
    root = cache_root(cache_dir)
    # The endpoint is part of the path: the same bucket name on two stores is two things.
    host = re.sub(r"[^A-Za-z0-9.\-]", "_", settings_from_env().endpoint)
    # One flat folder per prefix: s3://b/a and s3://b/a/x must never nest, or publishing the
    # parent would upload (and its mirror delete against) the child's copy.
    return os.path.join(root, "s3-read" if reader else "s3", host, bucket, quote("/" + prefix, safe=""))


def output_target(uri: str) -> str:
    """``uri`` as a place an output may be written to: a local folder, or an s3:// / minio://
    prefix. A bare bucket is refused: an output owns everything under its prefix."""
    if not is_remote(uri):
        return local_path(uri)
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise BadUriError(f"refusing to write an output to the bare bucket {uri}: an output owns its whole prefix, "
                          f"so give one of its own, e.g. {uri.rstrip('/')}/<name>")
    return uri

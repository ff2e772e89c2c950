"""Object storage (s3:// and minio:// URIs) and local paths behind one small API.

Steps take URIs for their inputs and outputs and work on local paths:

    data_dir = storage.local_input(uri)          # a local copy, verified (cached)
    with storage.local_output(uri) as out_dir:   # written locally, published on exit
        ...
    storage.mirror(local_dir, uri)               # push new/changed files (checkpoints)
    storage.restore(uri, local_dir)              # pull what a previous pod left

For local paths ``local_input`` / ``local_output`` return the path itself and ``mirror`` /
``restore`` are no-ops when both sides are the same folder. Besides these:
``exists``, ``list_files``, ``read_bytes`` / ``read_text``, ``write_bytes`` / ``write_text``,
``upload``, ``download`` and ``sync`` (folders). ``s3://bucket/prefix`` and
``minio://bucket/prefix`` (the scheme KFP uses for its artifacts) name the same store.

Guarantees:

- Every object carries its sha256 (user metadata ``x-amz-meta-sha256``); an upload is
  checked against size and checksum after it lands, a download is hashed as it streams and
  checked against the manifest entry (``{path, bytes, sha256}``) or the object's checksum.
  A sync skips files that are already present and equal.
- Atomic publish: an output counts as complete only when its manifest.json is present.
  An upload that changes anything under a prefix first removes the remote manifest.json,
  then uploads the files, then TF's ``checkpoint`` pointer, then manifest.json last.
  ``local_input`` refuses a prefix without manifest.json (``IncompleteError``) and reuses
  its local cache when the cache verifies against the manifest.
- Transient failures (connection errors, timeouts, HTTP 5xx, SlowDown / throttling) are
  retried with exponential backoff, bounded by a number of attempts and a total time;
  then the transfer fails with a ``StorageError``; a re-run skips what already landed.
- An output owns its prefix or folder (``local_output(uri, kind)``): a bare bucket is
  refused, so is a location holding anything but an output of the same kind (the owner
  marker ``.hrnet-output.json`` is written before any data); a publish deletes only what
  the output's previous manifest listed or this process transferred; a writer holds a
  lease (``Lease``) while it writes, so a second writer is refused.
- Errors are ``hrnet.errors.HrnetError`` subclasses that name the problem (unknown scheme,
  missing bucket, denied credentials, unreachable endpoint). No credential value appears
  in any message or log line.

Environment (a Kubernetes Secret fills these in the cluster):

==============================  ===========================================================
``S3_ENDPOINT``                 ``http://host:port``, ``https://host`` or ``host:port``.
                                Also read, in this order: ``AWS_ENDPOINT_URL_S3``,
                                ``AWS_ENDPOINT_URL``, ``MINIO_ENDPOINT``. Default: AWS S3.
``S3_USE_TLS``                  ``true`` / ``false``; overrides the endpoint URL's scheme.
                                Without either, TLS is on.
``S3_VERIFY_TLS``               ``false`` skips certificate verification (self-signed
                                in-cluster MinIO); ``SSL_CERT_FILE`` names a CA bundle.
``AWS_REGION``                  Region (also ``AWS_DEFAULT_REGION``); when unset it is asked
                                from the server per bucket.
``AWS_ACCESS_KEY_ID``           Credentials, with ``AWS_SECRET_ACCESS_KEY`` and optional
                                ``AWS_SESSION_TOKEN``; else ``MINIO_ACCESS_KEY`` /
                                ``MINIO_SECRET_KEY``; none: anonymous requests.
``HRNET_S3_WORKERS``            Files transferred in parallel (8).
``HRNET_S3_PART_SIZE``          Multipart part size in bytes (64 MiB, at least 5 MiB);
                                larger files are uploaded in parts, 4 parts at a time.
``HRNET_S3_CONNECT_TIMEOUT``    Seconds to open a connection (5).
``HRNET_S3_READ_TIMEOUT``       Seconds to wait for data on an open connection (60).
``HRNET_S3_RETRIES``            Attempts per request before giving up (5).
``HRNET_S3_RETRY_DEADLINE``     Seconds after which no further attempt starts (120).
``HRNET_S3_BACKOFF``            First retry delay in seconds, doubled each retry (0.5).
``HRNET_CACHE_DIR``             Root of the local copies (``~/.cache/hrnet``).
``HRNET_LEASE_TTL``             Seconds a writer's lease on its output lasts unless renewed
                                (120); renewed every third of it.
``HRNET_RUN_ID``                The pipeline run (or any id) a writer belongs to: a lease left
                                by the same run id (a retried pod) is taken over at once.
==============================  ===========================================================
"""
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from tqdm import tqdm

from hrnet.errors import HrnetError, IncompleteError
from hrnet.fileio import PARTIAL_SUFFIX, atomic_write, file_digest, replacing  # PARTIAL_SUFFIX: never uploaded
from hrnet.manifest import MANIFEST

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3://", "minio://")
MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's smallest multipart part
SHA256_META = "x-amz-meta-sha256"
# Uploaded after the data (a restarted trainer must never find a pointer to a checkpoint
# whose files are not there yet); manifest.json goes after everything.
POINTER_FILES = ("checkpoint",)
# Bookkeeping at the top of an output, never part of its data: which kind of output owns the
# prefix or folder (written before any data, so an unfinished output is still recognised as
# ours), and the lease of the writer working on it now.
OWNER_FILE = ".hrnet-output.json"
LEASE_FILE = ".hrnet-lease.json"
CONTROL_FILES = (OWNER_FILE, LEASE_FILE)
# Seconds a writer's lease lasts unless renewed: how long a crashed writer blocks its output.
# The pipeline's train retries wait longer than this (pipelines/hrnet_pipeline.py).
LEASE_TTL = 120.0


# ---------------------------------------------------------------------------- errors

class StorageError(HrnetError):
    """An object-storage operation failed; the message says which and why."""


class BadUriError(StorageError, ValueError):
    """A URI that is not s3://bucket/prefix, minio://bucket/prefix or a local path."""


class ConfigError(StorageError):
    """The S3 environment variables are wrong (endpoint, TLS, region, part size...)."""


class BucketNotFoundError(StorageError):
    """The bucket named in a URI does not exist on the endpoint."""


class AccessDeniedError(StorageError):
    """The store refused the credentials, or they do not grant access."""


class EndpointUnreachableError(StorageError):
    """No connection to the endpoint could be opened within the retry budget."""


class TransferError(StorageError):
    """A transfer kept failing with transient errors until the retry budget ran out."""


class IntegrityError(StorageError):
    """An object or local file does not match its recorded size and sha256."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object (and no folder) at the URI."""


class ChangedError(StorageError):
    """An object changed between listing and reading it: someone is writing the prefix."""


class OwnershipError(StorageError):
    """An output location that holds something this step did not write (or another kind of
    output): writing there could destroy it, so the step refuses."""


class LeaseHeldError(StorageError):
    """Another writer holds the lease on an output."""


class LeaseLostError(StorageError):
    """This writer's lease on its output expired or was taken over while it worked."""


class _Mismatch(Exception):
    """Retried once more before it becomes an IntegrityError (a torn transfer)."""


# ---------------------------------------------------------------------------- settings

_ENDPOINT_VARS = ("S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MINIO_ENDPOINT")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class S3Settings:
    """Where the store is and how to talk to it; read from the environment."""

    endpoint: str = "s3.amazonaws.com"  # host[:port]
    secure: bool = True
    cert_check: bool = True
    region: Optional[str] = None
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    workers: int = 8
    part_size: int = 64 * MIB
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 5
    retry_deadline: float = 120.0
    backoff: float = 0.5

    @property
    def url(self) -> str:
        return ("https://" if self.secure else "http://") + self.endpoint

    def redact(self, text: str) -> str:
        """``text`` with every credential value replaced by ``***``."""
        for secret in (self.secret_key, self.session_token, self.access_key):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


def _env_bool(env, name: str) -> Optional[bool]:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _env_number(env, name: str, default, kind=float, minimum=None):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {raw}")
    return value


def settings_from_env(env=None) -> S3Settings:
    """S3Settings from the environment variables listed in the module docstring."""
    env = os.environ if env is None else env
    endpoint, tls = "s3.amazonaws.com", None
    name = next((n for n in _ENDPOINT_VARS if env.get(n, "").strip()), None)
    if name:
        raw = env[name].strip()
        if "://" in raw:
            parts = urlsplit(raw)
            if parts.scheme not in ("http", "https"):
                raise ConfigError(f"{name} must be http(s)://host[:port] or host[:port], not a {parts.scheme}:// URL")
            if "@" in parts.netloc:
                raise ConfigError(f"{name} holds credentials; put them in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                  "instead")
            if parts.path.strip("/") or parts.query:
                raise ConfigError(f"{name} must name the server only (scheme://host:port), without a path: "
                                  f"{parts.scheme}://{parts.netloc}{parts.path}")
            endpoint, tls = parts.netloc, parts.scheme == "https"
        else:
            if "@" in raw:
                raise ConfigError(f"{name} holds credentials; put them in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                  "instead")
            endpoint = raw.rstrip("/")
            if "/" in endpoint:
                raise ConfigError(f"{name} must be host[:port] or http(s)://host[:port], not {raw!r}")
        if not endpoint:
            raise ConfigError(f"{name} names no host: {raw!r}")
    use_tls = _env_bool(env, "S3_USE_TLS")
    secure = use_tls if use_tls is not None else (tls if tls is not None else True)
    verify = _env_bool(env, "S3_VERIFY_TLS")

    access_key = env.get("AWS_ACCESS_KEY_ID") or None
    secret_key = env.get("AWS_SECRET_ACCESS_KEY") or None
    key_names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    if not access_key and not secret_key:
        access_key = env.get("MINIO_ACCESS_KEY") or None
        secret_key = env.get("MINIO_SECRET_KEY") or None
        key_names = ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY")
    if bool(access_key) != bool(secret_key):
        missing = key_names[1] if access_key else key_names[0]
        raise ConfigError(f"{key_names[0] if access_key else key_names[1]} is set but {missing} is not")

    return S3Settings(
        endpoint=endpoint,
        secure=secure,
        cert_check=verify is not False,
        region=(env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip() or None,
        access_key=access_key,
        secret_key=secret_key,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
        workers=_env_number(env, "HRNET_S3_WORKERS", 8, int, 1),
        part_size=_env_number(env, "HRNET_S3_PART_SIZE", 64 * MIB, int, MIN_PART_SIZE),
        connect_timeout=_env_number(env, "HRNET_S3_CONNECT_TIMEOUT", 5.0, float, 0.1),
        read_timeout=_env_number(env, "HRNET_S3_READ_TIMEOUT", 60.0, float, 0.1),
        retries=_env_number(env, "HRNET_S3_RETRIES", 5, int, 1),
        retry_deadline=_env_number(env, "HRNET_S3_RETRY_DEADLINE", 120.0, float, 0.0),
        backoff=_env_number(env, "HRNET_S3_BACKOFF", 0.5, float, 0.0),
    )


_clients: Dict[S3Settings, Minio] = {}
_clients_lock = threading.Lock()


def _client(s: S3Settings) -> Minio:
    with _clients_lock:
        client = _clients.get(s)
        if client is None:
            # Our own pool: short connect timeout, and no urllib3 retries (ours are bounded
            # in time and log what they do).
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=s.connect_timeout, read=s.read_timeout),
                maxsize=s.workers * 4 + 4,
                cert_reqs="CERT_REQUIRED" if s.cert_check else "CERT_NONE",
                ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
                retries=False,
            )
            client = Minio(s.endpoint, access_key=s.access_key, secret_key=s.secret_key,
                           session_token=s.session_token, secure=s.secure, region=s.region,
                           http_client=http, cert_check=s.cert_check)
            _clients[s] = client
        return client


# ---------------------------------------------------------------------------- URIs

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def _check_scheme(uri: str) -> None:
    if not isinstance(uri, str) or not uri:
        raise BadUriError(f"expected a URI or a local path, got {uri!r}")
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


def _local_path(uri: str) -> str:
    _check_scheme(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _key(prefix: str, rel: str) -> str:
    return prefix + "/" + rel if prefix else rel


def cache_path(uri: str, cache_dir: Optional[str] = None) -> str:
    """The local folder that holds the copy of ``uri`` (under HRNET_CACHE_DIR)."""
    bucket, prefix = split_uri(uri)
    root = cache_dir or os.environ.get("HRNET_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hrnet")
    # The endpoint is part of the path: the same bucket name on two stores is two things.
    host = re.sub(r"[^A-Za-z0-9.\-]", "_", settings_from_env().endpoint)
    # One flat folder per prefix: s3://b/a and s3://b/a/x must never nest, or publishing the
    # parent would upload (and its mirror delete against) the child's copy.
    return os.path.join(root, "s3", host, bucket, quote("/" + prefix, safe=""))


# ---------------------------------------------------------------------------- retries and errors

_TRANSIENT_CODES = frozenset({
    "SlowDown", "SlowDownRead", "SlowDownWrite", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "RequestTimeout", "InternalError", "ServiceUnavailable", "OperationAborted",
    "XMinioServerNotInitialized", "XMinioReadQuorum", "XMinioWriteQuorum",
})
_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "TokenRefreshRequired", "AllAccessDisabled", "InvalidClientTokenId", "AccountProblem", "InvalidSecurity",
    "UnauthorizedAccess", "XMinioInvalidToken",
})
_CONNECT_ERRORS = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)


def _status(exc: Exception) -> int:
    if isinstance(exc, S3Error):
        return getattr(exc.response, "status", 0) or 0
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        return getattr(exc, "_code", 0) or 0
    return 0


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, _Mismatch):
        return True
    if isinstance(exc, urllib3.exceptions.SSLError):
        return False
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES or _status(exc) >= 500 or _status(exc) == 429
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return _status(exc) >= 500 or _status(exc) == 429
    return False


def _describe(s: S3Settings, exc: Exception) -> str:
    if isinstance(exc, S3Error):
        text = f"{exc.code} (HTTP {_status(exc)})" if _status(exc) else str(exc.code)
    elif isinstance(exc, (ServerError, InvalidResponseError)):
        text = f"HTTP {_status(exc)}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return s.redact(text)[:300]


def _translate(s: S3Settings, what: str, exc: Exception) -> Exception:
    """A clear HrnetError for a permanent failure, or ``exc`` itself if it is not ours to explain."""
    if isinstance(exc, HrnetError):
        return exc
    if isinstance(exc, S3Error):
        code = exc.code or ""
        if code == "NoSuchBucket":
            return BucketNotFoundError(s.redact(
                f"{what}: there is no bucket {exc.bucket_name or ''!r} at {s.url} (create it, or fix the URI)"))
        if code in _DENIED_CODES:
            return AccessDeniedError(s.redact(
                f"{what}: access denied by {s.url} ({code}): check the credentials in AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or MINIO_ACCESS_KEY / MINIO_SECRET_KEY) and what they are allowed to do"))
        if code in ("NoSuchKey", "NoSuchObject"):
            return ObjectNotFoundError(s.redact(f"{what}: no such object"))
        if code in ("AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "InvalidRegion"):
            return ConfigError(s.redact(
                f"{what}: wrong region ({code}: {exc.message}); set AWS_REGION to the bucket's region"))
        return StorageError(s.redact(f"{what}: {code}: {exc.message}"))
    if isinstance(exc, InvalidResponseError):
        return StorageError(s.redact(
            f"{what}: {s.url} answered HTTP {_status(exc)} ({getattr(exc, '_content_type', None)}), which is not an "
            "S3 response: is it an S3 / MinIO API endpoint, and is S3_USE_TLS right?"))
    if isinstance(exc, ServerError):
        return StorageError(s.redact(f"{what}: {s.url} answered HTTP {_status(exc)}"))
    if isinstance(exc, urllib3.exceptions.SSLError):
        return ConfigError(s.redact(
            f"{what}: TLS with {s.url} failed ({exc}): set S3_USE_TLS=false for a plain-HTTP endpoint, "
            "SSL_CERT_FILE for a private CA, or S3_VERIFY_TLS=false"))
    return exc


def _give_up(s: S3Settings, what: str, exc: Exception, attempts: int, elapsed: float) -> StorageError:
    tried = f"after {attempts} attempt{'' if attempts == 1 else 's'} in {elapsed:.1f}s"
    if isinstance(exc, _CONNECT_ERRORS):
        return EndpointUnreachableError(s.redact(
            f"{what}: cannot reach the object store at {s.url} ({_describe(s, exc)}) {tried}: check S3_ENDPOINT "
            "(or AWS_ENDPOINT_URL / MINIO_ENDPOINT), S3_USE_TLS and the network"))
    if isinstance(exc, _Mismatch):
        return IntegrityError(s.redact(f"{what}: {exc} ({tried})"))
    if s.access_key is None:
        # Some stores (SeaweedFS) answer an unsigned request with a server error, not 403.
        return AccessDeniedError(s.redact(
            f"{what}: {s.url} answered {_describe(s, exc)} to an anonymous request {tried}: no credentials are set; "
            "put them in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or MINIO_ACCESS_KEY / MINIO_SECRET_KEY)"))
    return TransferError(s.redact(f"{what}: still failing {tried}: {_describe(s, exc)}; run it again to resume "
                                  "(what landed is kept and skipped)"))


def _with_retries(s: S3Settings, what: str, fn: Callable[[], Any]) -> Any:
    """fn(), retried on transient errors with exponential backoff (bounded attempts and time)."""
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(exc):
                mapped = _translate(s, what, exc)
                if mapped is exc:
                    raise
                raise mapped from None
            elapsed = time.monotonic() - start
            delay = min(s.backoff * 2 ** (attempt - 1), 30.0) * random.uniform(0.75, 1.0)
            if attempt >= s.retries or elapsed + delay > s.retry_deadline:
                raise _give_up(s, what, exc, attempt, elapsed) from None
            log.warning("%s: %s; retry %d of %d in %.1fs", what, _describe(s, exc), attempt, s.retries - 1, delay)
            time.sleep(delay)


# ---------------------------------------------------------------------------- checksums

_digests: Dict[Tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()
# sha256 of remote objects we have seen, by ETag: lets a repeated mirror skip HEAD requests.
_remote_sha: Dict[Tuple[str, str, str, str], str] = {}


def _local_sha256(path: str) -> Tuple[int, str, int]:
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


def _parse_manifest(data: bytes, where: str) -> Dict[str, Tuple[int, str]]:
    try:
        return _manifest_entries(json.loads(data.decode("utf-8")))
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{where}/{MANIFEST} is not valid JSON") from None


# ---------------------------------------------------------------------------- progress

class _Progress:
    """A byte-counting tqdm bar shared by the transfer threads, plus start/end log lines."""

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


class _CountingReader:
    """A file for minio's put_object that moves the progress bar as minio reads it."""

    def __init__(self, f, progress: _Progress):
        self.f, self.progress, self.count = f, progress, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.count += len(data)
        self.progress.update(len(data))
        return data


# ---------------------------------------------------------------------------- object operations

@dataclass
class _Obj:
    size: int
    etag: str


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


def _list_objects(s: S3Settings, bucket: str, prefix: str, uri: str, control: bool = False) -> Dict[str, _Obj]:
    """Objects under ``prefix/`` by path relative to the prefix (the owner and lease
    objects only with ``control``)."""
    base = prefix + "/" if prefix else ""
    client = _client(s)

    def go():
        found = {}
        for obj in client.list_objects(bucket, prefix=base or None, recursive=True):
            name = obj.object_name or ""
            if obj.is_dir or name.endswith("/") or not name.startswith(base):
                continue
            rel = name[len(base):]
            if rel in CONTROL_FILES and not control:
                continue
            found[rel] = _Obj(int(obj.size or 0), (obj.etag or "").strip('"'))
        return found

    return _with_retries(s, f"list {uri}", go)


def _head(s: S3Settings, bucket: str, key: str, what: str) -> Optional[Tuple[int, Optional[str], str]]:
    """(bytes, sha256 or None, etag) of an object, None when there is none."""
    client = _client(s)

    def go():
        try:
            st = client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        return int(st.size or 0), st.metadata.get(SHA256_META), (st.etag or "").strip('"')

    return _with_retries(s, what, go)


# Objects this process uploaded to or downloaded from each prefix: the ones a mirror with
# ``delete`` may remove once their local file is gone (a checkpoint the trainer dropped).
_transferred: Dict[Tuple[str, str, str], set] = {}


def _known(s: S3Settings, bucket: str, prefix: str) -> set:
    with _digests_lock:
        return _transferred.setdefault((s.endpoint, bucket, prefix), set())


def _remote_digest(s: S3Settings, bucket: str, key: str, obj: _Obj) -> Optional[str]:
    memo = (s.endpoint, bucket, key, obj.etag)
    if obj.etag and memo in _remote_sha:
        return _remote_sha[memo]
    info = _head(s, bucket, key, f"check s3://{bucket}/{key}")
    if info is None:
        return None
    if info[1] and info[2]:
        _remote_sha[(s.endpoint, bucket, key, info[2])] = info[1]
    # Another version than the one listed: its checksum says nothing about the listed one.
    return info[1] if not obj.etag or info[2] == obj.etag else None


def _put_file(s: S3Settings, bucket: str, key: str, path: str, progress: _Progress) -> int:
    """Upload one file with its sha256, then check the object; returns its size."""
    client = _client(s)

    def go():
        size, sha, mtime = _local_sha256(path)
        reader = None
        try:
            with open(path, "rb") as f:
                reader = _CountingReader(f, progress)
                result = client.put_object(bucket, key, reader, size, metadata={"sha256": sha},
                                           part_size=s.part_size, num_parallel_uploads=4)
        except BaseException:
            progress.update(-(reader.count if reader else 0))
            raise
        if os.stat(path).st_mtime_ns != mtime:
            raise _Mismatch(f"{path} changed while it was uploaded")
        info = client.stat_object(bucket, key)
        got_sha = info.metadata.get(SHA256_META)
        if int(info.size or 0) != size or got_sha != sha:
            raise _Mismatch(f"object is {info.size} bytes with sha256 {got_sha} after upload, "
                            f"expected {size} bytes with {sha}")
        _remote_sha[(s.endpoint, bucket, key, (result.etag or info.etag or "").strip('"'))] = sha
        return size

    return _with_retries(s, f"upload s3://{bucket}/{key}", go)


def _get_file(s: S3Settings, bucket: str, key: str, dest: str, expect: Optional[Tuple[int, str]],
              progress: _Progress, etag: str = "") -> int:
    """Download one object to ``dest`` (via a partial file), hashed as it streams; returns its size.
    ``etag``: the version listed; another one means the object is being rewritten (ChangedError)."""
    client = _client(s)
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
                raise _Mismatch(f"received {received} bytes with sha256 {digest}, "
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

    return _with_retries(s, f"download s3://{bucket}/{key}", go)


def _remove_object(s: S3Settings, bucket: str, key: str) -> None:
    _with_retries(s, f"delete s3://{bucket}/{key}", lambda: _client(s).remove_object(bucket, key))


def _check_bucket(s: S3Settings, bucket: str, uri: str) -> None:
    if not _with_retries(s, f"open {uri}", lambda: _client(s).bucket_exists(bucket)):
        raise BucketNotFoundError(f"{uri}: there is no bucket {bucket!r} at {s.url} (create it, or fix the URI)")


def _parallel(s: S3Settings, tasks: List[Callable[[], Any]]) -> List[Any]:
    """Run tasks on s.workers threads; the first failure cancels what has not started."""
    if not tasks:
        return []
    results: List[Any] = [None] * len(tasks)
    errors: List[BaseException] = []
    with ThreadPoolExecutor(max_workers=min(s.workers, len(tasks))) as pool:
        futures = {pool.submit(task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except BaseException as exc:
                errors.append(exc)
                for other in futures:
                    other.cancel()
    if errors:
        for exc in errors[1:]:
            log.error("also failed: %s", exc)
        raise errors[0]
    return results


# ---------------------------------------------------------------------------- folder transfers

def _walk(local_dir: str) -> Dict[str, str]:
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


def _upload_dir(s: S3Settings, local_dir: str, uri: str, delete: bool, strict: bool,
                progress: Optional[bool]) -> TransferStats:
    bucket, prefix = split_uri(uri)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"no such directory: {local_dir}")
    started = time.monotonic()
    files = _walk(local_dir)
    remote = _list_objects(s, bucket, prefix, uri)
    stats = TransferStats(files=len(files))

    # Local files must match the manifest they are published with.
    entries = {}
    if MANIFEST in files:
        with open(files[MANIFEST], "rb") as f:
            entries = _parse_manifest(f.read(), local_dir)
    local = dict(zip(files, _parallel(s, [lambda p=p: _local_sha256(p) for p in files.values()])))
    for rel, (size, sha) in entries.items():
        if rel not in local:
            if strict:
                raise IntegrityError(f"{MANIFEST} lists {rel}, which is not in {local_dir}")
        elif local[rel][:2] != (size, sha):
            raise IntegrityError(f"{files[rel]} does not match its {MANIFEST} entry ({size} bytes, sha256 {sha}): "
                                 "it changed or is corrupt")

    def unchanged(rel):
        obj = remote.get(rel)
        return obj is not None and obj.size == local[rel][0] and \
            _remote_digest(s, bucket, _key(prefix, rel), obj) == local[rel][1]

    names = [rel for rel in files if rel != MANIFEST]
    same = dict(zip(names, _parallel(s, [lambda r=r: unchanged(r) for r in names])))
    todo = [rel for rel in names if not same[rel]]
    known = _known(s, bucket, prefix)
    known.update(rel for rel in names if same[rel])
    stale = []
    if delete:
        gone = [rel for rel in remote if rel not in files and rel != MANIFEST]
        # Only what this output wrote may go: what its previous manifest listed, and what
        # this process uploaded there or downloaded from there. Anything else under the
        # prefix was put there by someone else and is left alone.
        ours = set(known)
        if gone and MANIFEST in remote:
            ours |= set(_parse_manifest(_get_bytes(s, bucket, _key(prefix, MANIFEST), uri + "/" + MANIFEST), uri))
        stale = [rel for rel in gone if rel in ours]
        kept = [rel for rel in gone if rel not in ours]
        if kept:
            log.warning("%s: leaving %d object(s) this output did not write (%s%s)", uri, len(kept),
                        ", ".join(kept[:3]), ", ..." if len(kept) > 3 else "")
    manifest_same = MANIFEST in files and unchanged(MANIFEST)
    stats.skipped = len(names) - len(todo) + int(manifest_same)
    if not todo and not stale and (manifest_same or (MANIFEST not in files and MANIFEST not in remote)):
        log.info("%s is up to date (%d files)", uri, len(files))
        return stats

    # Unpublish first: from here until the new manifest lands, readers see "incomplete".
    if MANIFEST in remote:
        _remove_object(s, bucket, _key(prefix, MANIFEST))
    new_manifest = MANIFEST in files and not manifest_same
    total = sum(local[rel][0] for rel in todo) + (local[MANIFEST][0] if new_manifest else 0)
    log.info("uploading %d of %d files (%.1f MiB) from %s to %s", len(todo) + int(new_manifest), len(files),
             total / MIB, local_dir, uri)
    bar = _Progress(f"upload {uri}", total, progress)
    try:
        data = [rel for rel in todo if not _is_pointer(rel)]
        sizes = _parallel(s, [lambda r=r: _put_file(s, bucket, _key(prefix, r), files[r], bar) for r in data])
        for rel in todo:
            if _is_pointer(rel):
                sizes.append(_put_file(s, bucket, _key(prefix, rel), files[rel], bar))
        _parallel(s, [lambda r=r: _remove_object(s, bucket, _key(prefix, r)) for r in stale])
        if MANIFEST in files:
            sizes.append(_put_file(s, bucket, _key(prefix, MANIFEST), files[MANIFEST], bar))
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


def _download_dir(s: S3Settings, uri: str, local_dir: str, delete: bool, progress: Optional[bool],
                  remote: Optional[Dict[str, _Obj]] = None, manifest: Optional[bytes] = None,
                  include: Optional[Callable[[str], bool]] = None) -> TransferStats:
    """``include``: fetch only these files; ``delete`` then removes only local files that are
    no longer at ``uri`` at all (another split's copies stay for the steps that read them)."""
    bucket, prefix = split_uri(uri)
    started = time.monotonic()
    if remote is None:
        remote = _list_objects(s, bucket, prefix, uri)
    if manifest is None and MANIFEST in remote:
        manifest = _get_bytes(s, bucket, _key(prefix, MANIFEST), uri + "/" + MANIFEST)
    entries = _parse_manifest(manifest, uri) if manifest is not None else {}
    for rel, (size, _) in entries.items():
        if rel not in remote:
            raise IntegrityError(f"{uri}/{MANIFEST} lists {rel}, but there is no such object")
        if remote[rel].size != size:
            raise IntegrityError(f"{uri}/{rel} is {remote[rel].size} bytes, but its {MANIFEST} entry says {size}")
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
        want = entries[rel][1] if rel in entries else _remote_digest(s, bucket, _key(prefix, rel), obj)
        if want:
            return _local_sha256(path)[1] == want
        # A foreign object without our checksum: a single-part upload's ETag is its MD5.
        if re.fullmatch(r"[0-9a-f]{32}", obj.etag):
            return file_digest(path, "md5") == obj.etag
        return False

    same = dict(zip(names, _parallel(s, [lambda r=r: unchanged(r) for r in names])))
    todo = [rel for rel in names if not same[rel]]
    total = sum(remote[rel].size for rel in todo)
    if todo:
        part = ""
        if include:
            shown = ", ".join(todo[:4]) + (", ..." if len(todo) > 4 else "")
            part = f" ({shown}: this step reads {len(names)} of {len(remote) - int(MANIFEST in remote)})"
        log.info("downloading %d of %d files%s (%.1f MiB) from %s to %s", len(todo), len(names), part, total / MIB,
                 uri, local_dir)
    bar = _Progress(f"download {uri}", total, progress)
    try:
        for rel in todo:
            os.makedirs(os.path.dirname(paths[rel]), exist_ok=True)
        sizes = _parallel(s, [lambda r=r: _get_file(s, bucket, _key(prefix, r), paths[r], entries.get(r), bar,
                                                    remote[r].etag) for r in todo])
    finally:
        bar.close()
    _known(s, bucket, prefix).update(names)
    stats = TransferStats(files=len(names) + int(manifest is not None), transferred=len(todo), bytes=sum(sizes),
                          skipped=len(names) - len(todo))
    if delete:
        keep = (present if include else set(paths.values())) | {os.path.join(local_dir, MANIFEST)}
        for path in _walk(local_dir).values():
            if path not in keep:
                os.remove(path)
                stats.deleted += 1
    if manifest is not None:
        atomic_write(os.path.join(local_dir, MANIFEST), manifest)
    if todo or stats.deleted:
        log.info("downloaded %s to %s: %s in %.1fs", uri, local_dir, stats, time.monotonic() - started)
    return stats


def _copy_dir(src: str, dst: str, delete: bool) -> TransferStats:
    """Local-to-local sync with the same rules (skip equal files, manifest last)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no such directory: {src}")
    if os.path.realpath(src) == os.path.realpath(dst):
        return TransferStats()
    files = _walk(src)
    stats = TransferStats(files=len(files))
    os.makedirs(dst, exist_ok=True)
    # Unpublish first, as for a bucket: dst has no manifest until the new one is copied.
    old_manifest = os.path.join(dst, MANIFEST)
    if os.path.exists(old_manifest) and (MANIFEST not in files or
                                         _local_sha256(old_manifest)[:2] != _local_sha256(files[MANIFEST])[:2]):
        os.remove(old_manifest)
    order = sorted(files, key=lambda rel: (rel == MANIFEST, _is_pointer(rel), rel))
    for rel in order:
        target = os.path.join(dst, *rel.split("/"))
        if os.path.isfile(target) and _local_sha256(target)[:2] == _local_sha256(files[rel])[:2]:
            stats.skipped += 1
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with replacing(target) as tmp:
            shutil.copy2(files[rel], tmp)
        stats.transferred += 1
        stats.bytes += os.path.getsize(target)
    if delete:
        for rel, path in _walk(dst).items():
            if rel not in files:
                os.remove(path)
                stats.deleted += 1
    return stats




def _get_bytes(s: S3Settings, bucket: str, key: str, uri: str) -> bytes:
    client = _client(s)

    def go():
        response = client.get_object(bucket, key)
        try:
            data = response.read()
            meta_sha = response.headers.get(SHA256_META)
        finally:
            response.close()
            response.release_conn()
        if meta_sha and hashlib.sha256(data).hexdigest() != meta_sha:
            raise _Mismatch("received data does not match the object's sha256")
        return data

    try:
        return _with_retries(s, f"read {uri}", go)
    except ObjectNotFoundError:
        # With AWS_REGION set, a missing bucket answers a plain 404 too: say which it is.
        _check_bucket(s, bucket, uri)
        raise


# ---------------------------------------------------------------------------- public API

def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri`` (for a bare bucket: the bucket). A URI in
    a bucket that does not exist is an error (BucketNotFoundError), not False."""
    if not is_remote(uri):
        return os.path.exists(_local_path(uri))
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    if not prefix:
        return bool(_with_retries(s, f"check {uri}", lambda: _client(s).bucket_exists(bucket)))
    if _head(s, bucket, prefix, f"check {uri}") is not None:
        return True
    client = _client(s)

    def any_below():
        return next(iter(client.list_objects(bucket, prefix=prefix + "/")), None) is not None

    return bool(_with_retries(s, f"check {uri}", any_below))


def list_files(uri: str) -> List[str]:
    """Relative paths ('/'-separated, sorted) of every file under the folder ``uri``."""
    if not is_remote(uri):
        path = _local_path(uri)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such directory: {path}")
        return sorted(_walk(path))
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    return sorted(_list_objects(s, bucket, prefix, uri))


def read_bytes(uri: str) -> bytes:
    """The content of a small file (whole in memory), checked against its sha256."""
    if not is_remote(uri):
        with open(_local_path(uri), "rb") as f:
            return f.read()
    s = settings_from_env()
    bucket, key = split_uri(uri)
    if not key:
        raise BadUriError(f"{uri} names a bucket, not a file")
    return _get_bytes(s, bucket, key, uri)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small file atomically (locally: temp file and rename), with its sha256."""
    if not is_remote(uri):
        path = _local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, data)
        return
    s = settings_from_env()
    bucket, key = split_uri(uri)
    if not key:
        raise BadUriError(f"{uri} names a bucket, not a file")
    sha = hashlib.sha256(data).hexdigest()
    client = _client(s)

    def go():
        client.put_object(bucket, key, io.BytesIO(data), len(data), metadata={"sha256": sha})
        info = client.stat_object(bucket, key)
        if int(info.size or 0) != len(data) or info.metadata.get(SHA256_META) != sha:
            raise _Mismatch("the object does not match what was written")

    _with_retries(s, f"write {uri}", go)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def upload(local_dir: str, uri: str, *, delete: bool = False, progress: Optional[bool] = None) -> TransferStats:
    """Copy a local folder to ``uri``: equal objects skipped, every object verified,
    manifest.json last; ``delete`` removes objects that are not in the local folder."""
    if not is_remote(uri):
        return _copy_dir(_local_path(local_dir), _local_path(uri), delete)
    return _upload_dir(settings_from_env(), _local_path(local_dir), uri, delete, strict=False, progress=progress)


def download(uri: str, local_dir: str, *, delete: bool = False, progress: Optional[bool] = None) -> TransferStats:
    """Copy the folder ``uri`` into ``local_dir``: equal files skipped, every file verified
    (against manifest.json when there is one), manifest.json written last; ``delete``
    removes local files that are not at ``uri``."""
    if is_remote(local_dir):
        raise BadUriError(f"download needs a local destination, not {local_dir}")
    if not is_remote(uri):
        return _copy_dir(_local_path(uri), _local_path(local_dir), delete)
    return _download_dir(settings_from_env(), uri, _local_path(local_dir), delete, progress)


def sync(src: str, dst: str, *, delete: bool = False, progress: Optional[bool] = None) -> TransferStats:
    """Make ``dst`` hold what ``src`` holds; either side a URI or a local path."""
    if is_remote(src) and is_remote(dst):
        with tempfile.TemporaryDirectory(prefix="hrnet-sync-") as tmp:
            download(src, tmp, progress=progress)
            return upload(tmp, dst, delete=delete, progress=progress)
    if is_remote(src):
        return download(src, dst, delete=delete, progress=progress)
    return upload(src, dst, delete=delete, progress=progress)


def local_input(uri: str, cache_dir: Optional[str] = None, verify: bool = True,
                include: Optional[Callable[[str], bool]] = None) -> str:
    """A local folder holding the complete output at ``uri`` (its manifest.json present).

    A remote ``uri`` is copied to ``cache_path(uri, cache_dir)``; a copy already there is
    reused when it matches the remote manifest.json and its files verify against it
    (sizes, and sha256 unless ``verify`` is False). ``include(relative path)`` limits the
    copy to the files a step reads (one split of a data set); the manifest always comes."""
    if not is_remote(uri):
        return _local_path(uri)
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    dest = cache_path(uri, cache_dir)
    remote = _list_objects(s, bucket, prefix, uri)
    if MANIFEST not in remote:
        if not remote:
            raise ObjectNotFoundError(f"{uri} does not exist (there are no objects under it)")
        raise IncompleteError(f"{uri} has no {MANIFEST}: it is incomplete (still being written, or its writer died); "
                              "refusing to read it")
    manifest_uri = uri + "/" + MANIFEST

    def current_manifest():
        try:
            return _get_bytes(s, bucket, _key(prefix, MANIFEST), manifest_uri)
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
        now = _list_objects(s, bucket, prefix, uri)
        return {k: o.etag for k, o in now.items()} != {k: o.etag for k, o in remote.items()}

    try:
        _download_dir(s, uri, dest, delete=True, progress=None, remote=remote, manifest=manifest, include=include)
    except ChangedError:
        raise republished() from None
    except (IntegrityError, ObjectNotFoundError):
        if changed():
            raise republished() from None
        raise
    if changed():
        raise republished()
    return dest


def _cache_matches(s: S3Settings, uri: str, dest: str, remote: Dict[str, _Obj], manifest: bytes,
                   verify: bool, include: Optional[Callable[[str], bool]] = None) -> bool:
    path = os.path.join(dest, MANIFEST)
    try:
        with open(path, "rb") as f:
            if f.read() != manifest:
                return False
    except OSError:
        return False
    entries = _parse_manifest(manifest, dest)
    if include is not None:
        remote = {rel: obj for rel, obj in remote.items() if rel == MANIFEST or include(rel)}
        entries = {rel: entry for rel, entry in entries.items() if include(rel)}
    local = _walk(dest)
    for rel, obj in remote.items():
        if rel not in local or os.path.getsize(local[rel]) != obj.size:
            return False
    if not verify:
        return all(os.path.getsize(local[rel]) == size for rel, (size, _) in entries.items() if rel in local)
    bucket, prefix = split_uri(uri)

    def same(rel):
        if rel in entries:
            return rel in local and _local_sha256(local[rel])[:2] == entries[rel]
        # Not in the manifest (logs, checkpoints): the object's own checksum, when it has one.
        want = _remote_digest(s, bucket, _key(prefix, rel), remote[rel])
        return want is None or _local_sha256(local[rel])[1] == want

    names = set(entries) | {rel for rel in remote if rel != MANIFEST}
    return all(_parallel(s, [lambda r=r: same(r) for r in sorted(names)]))


# ---------------------------------------------------------------------------- ownership and leases

def output_target(uri: str) -> str:
    """``uri`` as a place an output may be written to: a local folder, or an s3:// / minio://
    prefix. A bare bucket is refused: an output owns everything under its prefix."""
    if not is_remote(uri):
        return _local_path(uri)
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise BadUriError(f"refusing to write an output to the bare bucket {uri}: an output owns its whole prefix, "
                          f"so give one of its own, e.g. {uri.rstrip('/')}/<name>")
    return uri


def _describe_foreign(names: List[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    return f"{len(names)} file{'' if len(names) == 1 else 's'} ({shown}{', ...' if len(names) > 3 else ''})"


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
        os.makedirs(target, exist_ok=True)
        names = [n for n in os.listdir(target) if n not in CONTROL_FILES]
        owner = _read_json_file(os.path.join(target, OWNER_FILE))
        manifest = _read_json_file(os.path.join(target, MANIFEST))
        _check_owner(uri, kind, names, owner, manifest)
        if owner is None and mark:
            atomic_write(os.path.join(target, OWNER_FILE), marker)
        return
    s = settings_from_env()
    bucket, prefix = split_uri(target)
    _check_bucket(s, bucket, uri)
    objects = _list_objects(s, bucket, prefix, uri, control=True)
    names = [rel for rel in objects if rel not in CONTROL_FILES]

    def remote_json(name):
        if name not in objects:
            return None
        try:
            return json.loads(_get_bytes(s, bucket, _key(prefix, name), uri + "/" + name).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, ObjectNotFoundError):
            return {}

    owner = remote_json(OWNER_FILE)
    _check_owner(uri, kind, names, owner, remote_json(MANIFEST) if MANIFEST in names else None)
    if owner is None and mark:
        write_bytes(_join(target, OWNER_FILE), marker)


def _read_json_file(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _check_owner(uri: str, kind: str, names: List[str], owner: Optional[Dict[str, Any]],
                 manifest: Optional[Dict[str, Any]]) -> None:
    if manifest is not None:
        found = manifest.get("kind")
        if found != kind:
            raise OwnershipError(f"{uri} already holds a {found or 'foreign'} output (its {MANIFEST}), not a {kind}: "
                                 "refusing to overwrite it; write to a new location")
        return
    if owner is not None:
        if owner.get("kind") != kind:
            raise OwnershipError(f"{uri} holds an unfinished {owner.get('kind') or 'unknown'} output, not a {kind}: "
                                 "refusing to write into it; write to a new location")
        return
    if names:
        raise OwnershipError(f"{uri} is not empty and is not an hrnet {kind} output: it holds "
                             f"{_describe_foreign(names)}; refusing to write there, since that could delete or "
                             "overwrite them: give an empty or new location")


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def sibling(uri: str, name: str) -> str:
    """The location ``name`` beside ``uri`` (a URI or a path): where a pipeline step keeps
    what it writes outside its own artifact (the records, the mirrored checkpoints)."""
    return _join(uri.rstrip("/").rsplit("/", 1)[0], name)


def _lease_ttl() -> float:
    return _env_number(os.environ, "HRNET_LEASE_TTL", LEASE_TTL, float, 1.0)


def _writer() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "run_id": os.environ.get("HRNET_RUN_ID", "")}


def _holder(body: Dict[str, Any]) -> str:
    run = f", run {body['run_id']}" if body.get("run_id") else ""
    return f"{body.get('host', '?')} pid {body.get('pid', '?')}{run}"


_live_tokens: set = set()  # the leases this process holds


def _is_stale(body: Dict[str, Any], now: float) -> bool:
    """A lease whose writer is gone: expired, left by this same run (a retried pod), or by
    a dead process on this host."""
    if float(body.get("expires", 0)) <= now:
        return True
    mine = _writer()
    if mine["run_id"] and body.get("run_id") == mine["run_id"]:
        return True
    if body.get("host") == mine["host"] and isinstance(body.get("pid"), int):
        if body["pid"] == mine["pid"]:
            # Not one of ours: an earlier incarnation with this pid (a restarted container).
            return body.get("token") not in _live_tokens
        try:
            os.kill(body["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


class Lease:
    """The right to write one output, held while a step writes it.

    Remote: an object ``<prefix>/.hrnet-lease.json`` naming the writer (host, pid, run id)
    with an expiry, renewed by a background thread every third of ``HRNET_LEASE_TTL``
    (LEASE_TTL). A second writer is refused while it is valid; one whose writer died expires
    (or is taken over at once by a retry of the same run, ``HRNET_RUN_ID``, or on the same
    host when its process is gone). Created with a conditional PUT where the store supports
    it, and read back either way. Local: an exclusive ``flock`` on the folder's lease file,
    which the kernel releases when the writer dies.
    ``force`` takes the lease whoever holds it (for a writer known to be gone)."""

    def __init__(self, uri: str, force: bool = False, lock_file: Optional[str] = None):
        self.uri, self.force = output_target(uri), force
        self.lock_file = lock_file or (None if is_remote(self.uri) else os.path.join(self.uri, LEASE_FILE))
        self.token = uuid.uuid4().hex
        self.lost: Optional[str] = None
        self._fd = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._etag = ""

    # -- local
    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(self.uri, exist_ok=True)
        path = self.lock_file
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_json_file(path) or {}
                if not self.force:
                    os.close(fd)
                    raise LeaseHeldError(f"{self.uri} is being written by {_holder(holder)}; wait for it to finish "
                                         "(or stop it), or pass --force if you are sure it is gone") from None
                log.warning("--force: writing %s although %s holds it", self.uri, _holder(holder))
                break
            # The holder unlinks the file when it is done: a lock on an unlinked file is no lock.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(_writer(), token=self.token)).encode())
        self._fd = fd

    # -- remote
    def _body(self, ttl: float) -> bytes:
        return json.dumps(dict(_writer(), token=self.token, ttl=ttl, expires=time.time() + ttl,
                               since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))).encode()

    def _read_remote(self) -> Tuple[Optional[Dict[str, Any]], str]:
        s = settings_from_env()
        bucket, prefix = split_uri(self.uri)
        key = _key(prefix, LEASE_FILE)
        client = _client(s)

        def go():
            try:
                response = client.get_object(bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    return None, ""
                raise
            try:
                data, etag = response.read(), (response.headers.get("ETag") or "").strip('"')
            finally:
                response.close()
                response.release_conn()
            try:
                body = json.loads(data.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                body = {}
            return (body if isinstance(body, dict) else {}), etag

        return _with_retries(s, f"read the lease of {self.uri}", go)

    def _put_remote(self, ttl: float, condition: Dict[str, str]) -> bool:
        """PUT the lease; False when the store says a condition failed (someone else won)."""
        s = settings_from_env()
        bucket, prefix = split_uri(self.uri)
        key = _key(prefix, LEASE_FILE)
        client = _client(s)
        data = self._body(ttl)

        def go():
            try:
                # minio-py's put_object turns unknown headers into user metadata; the
                # conditional-write headers must go out as they are.
                result = client._put_object(bucket, key, data, headers=dict(condition, **{
                    "Content-Type": "application/json"}))
            except S3Error as exc:
                if exc.code in ("PreconditionFailed", "ConditionalRequestConflict") or _status(exc) == 412:
                    return False
                raise
            self._etag = result.etag or ""
            return True

        return bool(_with_retries(s, f"write the lease of {self.uri}", go))

    def _acquire_remote(self) -> None:
        ttl = _lease_ttl()
        body, etag = self._read_remote()
        if body is not None and not self.force and not _is_stale(body, time.time()):
            raise self._held(body)
        if body is not None and self.force:
            log.warning("--force: taking the lease of %s from %s", self.uri, _holder(body))
        won = self._put_remote(ttl, {"If-None-Match": "*"} if body is None else ({"If-Match": etag} if etag else {}))
        now, _ = self._read_remote()
        if not won or now is None or now.get("token") != self.token:
            raise self._held(now or {})
        _live_tokens.add(self.token)
        self._thread = threading.Thread(target=self._renew, args=(ttl,), daemon=True, name="hrnet-lease")
        self._thread.start()

    def _held(self, body: Dict[str, Any]) -> LeaseHeldError:
        left = float(body.get("expires", 0)) - time.time()
        return LeaseHeldError(f"{self.uri} is being written by {_holder(body)} (lease expires in {max(0, left):.0f}s "
                              "unless renewed); wait for it to finish, or pass --force if you are sure it is gone")

    def _renew(self, ttl: float) -> None:
        expires = time.time() + ttl
        while not self._stop.wait(ttl / 3.0):
            try:
                body, etag = self._read_remote()
                if body is None or body.get("token") != self.token:
                    self.lost = f"taken over by {_holder(body)}" if body else "the lease object was deleted"
                    return
                if self._put_remote(ttl, {"If-Match": etag} if etag else {}):
                    expires = time.time() + ttl
            except StorageError as exc:
                log.warning("could not renew the lease of %s: %s", self.uri, exc)
            if time.time() > expires:
                self.lost = "it expired while the store could not be reached"
                return

    # -- both
    def __enter__(self) -> "Lease":
        if is_remote(self.uri):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def check(self) -> None:
        """LeaseLostError if another writer may have taken this output over."""
        if self.lost:
            raise LeaseLostError(f"lost the lease on {self.uri} ({self.lost}); stopping so that two writers never "
                                 "interleave: what this run published so far is kept")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        _live_tokens.discard(self.token)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.lock_file)  # while still locked: see _acquire_local
            os.close(self._fd)  # releases the flock
            self._fd = None
            return
        if is_remote(self.uri) and not self.lost:
            with contextlib.suppress(StorageError):
                body, _ = self._read_remote()
                if body is not None and body.get("token") == self.token:
                    s = settings_from_env()
                    bucket, prefix = split_uri(self.uri)
                    _remove_object(s, bucket, _key(prefix, LEASE_FILE))


# The leases this process holds, by output URI: mirror() checks its own before it writes.
_leases: Dict[str, Lease] = {}


def add_force_argument(parser) -> None:
    """``--force`` of every command that writes an output."""
    parser.add_argument("--force", action="store_true",
                        help="write even though another writer holds the output's lease (only for a writer known "
                             "to be gone; a crashed writer's lease expires by itself)")


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
    _check_bucket(s, bucket, uri)
    dest = cache_path(target, cache_dir)
    os.makedirs(dest, exist_ok=True)
    # The cache folder is leased too (two processes of one machine), its lock file beside it
    # so that the folder holds exactly what is published.
    with Lease(target, force=force) as lease, Lease(dest, force=force, lock_file=dest + ".lease"):
        _leases[target] = lease
        try:
            yield dest
        except BaseException:
            log.warning("not publishing %s: the step failed (its local files stay in %s)", uri, dest)
            raise
        finally:
            _leases.pop(target, None)
        if not os.path.exists(os.path.join(dest, MANIFEST)):
            log.warning("%s has no %s: readers will treat %s as incomplete", dest, MANIFEST, uri)
        lease.check()
        _upload_dir(s, dest, target, delete=True, strict=True, progress=None)


def mirror(local_dir: str, uri: str, delete: bool = False) -> TransferStats:
    """Upload what changed in ``local_dir`` to ``uri`` (no-op when uri is local_dir):
    files first, TF's ``checkpoint`` pointer after them, manifest.json last. ``delete``
    also removes objects whose local file is gone (checkpoints the trainer dropped)."""
    if not is_remote(uri):
        return _copy_dir(_local_path(local_dir), _local_path(uri), delete)
    lease = _leases.get(output_target(uri))
    if lease is not None:
        lease.check()
    return _upload_dir(settings_from_env(), _local_path(local_dir), uri, delete, strict=False, progress=None)


def restore(uri: str, local_dir: str) -> TransferStats:
    """Download what ``uri`` holds into ``local_dir`` (resume on another node); files
    already there and equal are kept. Nothing at ``uri`` is not an error: a fresh start."""
    if not is_remote(uri):
        src = _local_path(uri)
        if not os.path.isdir(src):
            return TransferStats()
        return _copy_dir(src, _local_path(local_dir), delete=False)
    s = settings_from_env()
    bucket, prefix = split_uri(uri)
    remote = _list_objects(s, bucket, prefix, uri)
    if not remote:
        log.info("nothing to restore from %s", uri)
        return TransferStats()
    return _download_dir(s, uri, _local_path(local_dir), delete=False, progress=None, remote=remote)

"""The lease a writer holds on its output while it writes, so that two never interleave."""
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from minio.error import S3Error

from hrnet.fileio import process_alive
from hrnet.storage import objects
from hrnet.storage.client import get_client, status_of, with_retries
from hrnet.storage.errors import LeaseHeldError, LeaseLostError, ObjectNotFoundError, StorageError
from hrnet.storage.settings import env_number, settings_from_env
from hrnet.storage.uris import LEASE_CLAIMS, LEASE_FILE, is_remote, object_key, output_target, split_uri

log = logging.getLogger("hrnet.storage")


# Seconds a writer's lease lasts unless renewed: how long a crashed writer blocks its output.
# The pipeline's train retries wait longer than this (pipelines/hrnet_pipeline.py).
LEASE_TTL = 120.0


def _lease_ttl() -> float:
    return env_number(os.environ, "HRNET_LEASE_TTL", LEASE_TTL, float, 1.0)


def _writer() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "run_id": os.environ.get("HRNET_RUN_ID", "")}


def _holder(body: Dict[str, Any]) -> str:
    run = f", run {body['run_id']}" if body.get("run_id") else ""
    return f"{body.get('host', '?')} pid {body.get('pid', '?')}{run}"


def read_json_file(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


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
        return not process_alive(body["pid"])
    return False


# How often a writer that keeps meeting another writer's claim tries again (with random,
# growing pauses: a few seconds in all) before it is refused as if the lease were held.
CLAIM_ATTEMPTS = 10
PROBE_PREFIX = "probe-"

# Whether a store honours conditional writes (If-None-Match), by endpoint URL: probed once
# per process. MinIO before 2024 (and its gateway code, as in juicefs) overwrites anyway.
_conditional_writes: Dict[str, bool] = {}


def _put(s, bucket: str, key: str, data: bytes, condition: Dict[str, str], what: str) -> Tuple[bool, str]:
    """(written, etag) of a PUT with conditional-write headers; written is False when the
    store says a condition failed."""
    client = get_client(s)

    def go():
        try:
            # minio-py's put_object turns unknown headers into user metadata; the
            # conditional-write headers must go out as they are.
            result = client._put_object(bucket, key, data, headers=dict(condition, **{
                "Content-Type": "application/json"}))
        except S3Error as exc:
            if exc.code in ("PreconditionFailed", "ConditionalRequestConflict") or status_of(exc) == 412:
                return False, ""
            raise
        return True, result.etag or ""

    return with_retries(s, what, go)


def _honours_conditional_writes(s, bucket: str, prefix: str, uri: str) -> bool:
    """Whether the store refuses a PUT with ``If-None-Match: *`` over an existing object,
    tried on a probe object under the output's claims."""
    if s.url not in _conditional_writes:
        key = object_key(prefix, f"{LEASE_CLAIMS}/{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            objects.put_bytes(s, bucket, key, b"{}", uri + "/" + LEASE_CLAIMS)
            try:
                written, _ = _put(s, bucket, key, b"{}", {"If-None-Match": "*"}, f"probe {s.url}")
            except StorageError as exc:
                if "NotImplemented" not in str(exc):
                    raise
                written = True  # the header is refused, so it cannot be relied on
        finally:
            objects.remove_object(s, bucket, key)
        _conditional_writes[s.url] = not written
        if written:
            log.info("the store at %s ignores conditional writes (a MinIO before 2024?): leases there are taken "
                     "through claim objects instead", s.url)
    return _conditional_writes[s.url]


class Lease:
    """The right to write one output, held while a step writes it.

    Remote: an object ``<prefix>/.hrnet-lease.json`` naming the writer (host, pid, run id)
    with an expiry, renewed by a background thread every third of ``HRNET_LEASE_TTL``
    (LEASE_TTL). A second writer is refused while it is valid; one whose writer died expires
    (or is taken over at once by a retry of the same run, ``HRNET_RUN_ID``, or on the same
    host when its process is gone). Created with a conditional PUT where the store supports
    it, and read back either way; where it does not (probed once per endpoint), each writer
    first claims the right to take the lease under a name of its own (``_take_under_claim``).
    Local: an exclusive ``flock`` on the folder's lease file, which the kernel releases when
    the writer dies.
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
        self._wrote = False  # a PUT of this lease was sent: release must look for it

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
                holder = read_json_file(path) or {}
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
        self._fd, self._wrote = fd, True
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(_writer(), token=self.token)).encode())

    # -- remote
    def _body(self, ttl: float) -> bytes:
        return json.dumps(dict(_writer(), token=self.token, ttl=ttl, expires=time.time() + ttl,
                               since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))).encode()

    def _read_remote(self) -> Tuple[Optional[Dict[str, Any]], str]:
        s = settings_from_env()
        bucket, prefix = split_uri(self.uri)
        key = object_key(prefix, LEASE_FILE)
        client = get_client(s)

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

        return with_retries(s, f"read the lease of {self.uri}", go)

    def _put_remote(self, ttl: float, condition: Dict[str, str]) -> bool:
        """PUT the lease; False when the store says a condition failed (someone else won)."""
        s = settings_from_env()
        bucket, prefix = split_uri(self.uri)
        written, self._etag = _put(s, bucket, object_key(prefix, LEASE_FILE), self._body(ttl), condition,
                                   f"write the lease of {self.uri}")
        return written

    def _acquire_remote(self) -> None:
        ttl = _lease_ttl()
        s = settings_from_env()
        if self.force or _honours_conditional_writes(s, *split_uri(self.uri), self.uri):
            self._take(ttl)
        else:
            self._take_under_claim(ttl)
        self._thread = threading.Thread(target=self._renew, args=(ttl,), daemon=True, name="hrnet-lease")
        self._thread.start()

    def _take(self, ttl: float) -> None:
        body, etag = self._read_remote()
        if body is not None and not self.force and not _is_stale(body, time.time()):
            raise self._held(body)
        if body is not None and self.force:
            log.warning("--force: taking the lease of %s from %s", self.uri, _holder(body))
        self._wrote = True
        won = self._put_remote(ttl, {"If-None-Match": "*"} if body is None else ({"If-Match": etag} if etag else {}))
        now, _ = self._read_remote()
        if not won or now is None or now.get("token") != self.token:
            raise self._held(now or {})

    def _take_under_claim(self, ttl: float) -> None:
        """_take where the store ignores conditional writes, and two writers that both read
        "no lease" would both write one. Each first writes a claim under a name of its own
        (nothing to overwrite), then lists the claims: only a writer that sees no live claim
        but its own goes on to _take, so two never take at once (a store's listing shows
        every write that completed before it: S3, MinIO and SeaweedFS are strongly
        consistent). Two that see each other both step back and try again after a random
        pause; the later one then finds the lease taken."""
        s = settings_from_env()
        bucket, prefix = split_uri(self.uri)
        claims = object_key(prefix, LEASE_CLAIMS)
        mine = f"{claims}/{self.token}.json"
        rivals: List[Dict[str, Any]] = []
        for attempt in range(CLAIM_ATTEMPTS):
            objects.put_bytes(s, bucket, mine, self._body(ttl), self.uri + "/" + LEASE_CLAIMS)
            try:
                rivals = self._live_claims(s, bucket, claims, mine)
                if not rivals:
                    return self._take(ttl)
            finally:
                objects.remove_object(s, bucket, mine)
            time.sleep(random.uniform(0.02, min(2.0, 0.05 * 2 ** attempt)))
        raise self._held(rivals[0])

    def _live_claims(self, s, bucket: str, claims: str, mine: str) -> List[Dict[str, Any]]:
        """The bodies of the other writers' claims; a dead writer's claim is deleted."""
        live = []
        for rel in objects.list_objects(s, bucket, claims, self.uri, control=True):
            key = f"{claims}/{rel}"
            if key == mine or rel.startswith(PROBE_PREFIX):
                continue
            try:
                body = json.loads(objects.get_bytes(s, bucket, key, self.uri + "/" + LEASE_CLAIMS).decode("utf-8"))
            except ObjectNotFoundError:
                continue  # its writer stepped back
            except (ValueError, UnicodeDecodeError):
                body = {}
            if isinstance(body, dict) and not _is_stale(body, time.time()):
                live.append(body)
            else:
                objects.remove_object(s, bucket, key)
        return live

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
        _live_tokens.add(self.token)  # from the first claim on: this process's other writers see it as live
        try:
            if is_remote(self.uri):
                self._acquire_remote()
            else:
                self._acquire_local()
        except BaseException:
            _live_tokens.discard(self.token)
            # A SIGTERM (cli.Stopped) between the PUT and its read-back left the lease
            # behind for its TTL: ``with`` runs no __exit__ for an __enter__ that raised.
            if self._wrote:
                self.__exit__(None, None, None)
            raise
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
                    objects.remove_object(s, bucket, object_key(prefix, LEASE_FILE))


# The leases this process holds, by output URI: a mirror checks its own before it writes.
leases: Dict[str, Lease] = {}


def add_force_argument(parser) -> None:
    """``--force`` of every command that writes an output."""
    parser.add_argument("--force", action="store_true",
                        help="write even though another writer holds the output's lease (only for a writer known "
                             "to be gone; a crashed writer's lease expires by itself)")

"""The minio client of each setting, and every request's retries: transient failures
(connection errors, timeouts, HTTP 5xx, throttling) are retried by tenacity with exponential
backoff and jitter, bounded by attempts and by time; permanent ones become errors that say
what to fix. No credential reaches a message."""
import logging
import os
import threading
import time
from typing import Any, Callable, Dict

import certifi
import tenacity
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from hrnet.errors import HrnetError
from hrnet.storage.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConfigError,
    EndpointUnreachableError,
    IntegrityError,
    Mismatch,
    ObjectNotFoundError,
    StorageError,
    TransferError,
)
from hrnet.storage.settings import S3Settings

log = logging.getLogger("hrnet.storage")


_clients: Dict[S3Settings, Minio] = {}
_clients_lock = threading.Lock()


def get_client(s: S3Settings) -> Minio:
    with _clients_lock:
        client = _clients.get(s)
        if client is None:
            # Our own pool: short connect timeout, and no urllib3 retries (with_retries'
            # are bounded in time and log what they do).
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


def status_of(exc: Exception) -> int:
    if isinstance(exc, S3Error):
        return getattr(exc.response, "status", 0) or 0
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        return getattr(exc, "_code", 0) or 0
    return 0


def is_transient(exc: Exception) -> bool:
    if isinstance(exc, Mismatch):
        return True
    if isinstance(exc, urllib3.exceptions.SSLError):
        return False
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES or status_of(exc) >= 500 or status_of(exc) == 429
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return status_of(exc) >= 500 or status_of(exc) == 429
    return False


def _describe(s: S3Settings, exc: Exception) -> str:
    if isinstance(exc, S3Error):
        text = f"{exc.code} (HTTP {status_of(exc)})" if status_of(exc) else str(exc.code)
    elif isinstance(exc, (ServerError, InvalidResponseError)):
        text = f"HTTP {status_of(exc)}"
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
            f"{what}: {s.url} answered HTTP {status_of(exc)} ({getattr(exc, '_content_type', None)}), which is not an "
            "S3 response: is it an S3 / MinIO API endpoint, and is S3_USE_TLS right?"))
    if isinstance(exc, ServerError):
        return StorageError(s.redact(f"{what}: {s.url} answered HTTP {status_of(exc)}"))
    if isinstance(exc, urllib3.exceptions.SSLError):
        return ConfigError(s.redact(
            f"{what}: TLS with {s.url} failed ({exc}): set S3_USE_TLS=false for a plain-HTTP endpoint, "
            "SSL_CERT_FILE for a private CA, or S3_VERIFY_TLS=false"))
    return exc


def _give_up(s: S3Settings, what: str, exc: Exception, attempts: int, elapsed: float) -> StorageError:
    """The error a transfer ends with once its retries are spent, redacted."""
    tried = f"after {attempts} attempt{'' if attempts == 1 else 's'} in {elapsed:.1f}s"
    if isinstance(exc, _CONNECT_ERRORS):
        kind, text = EndpointUnreachableError, (
            f"{what}: cannot reach the object store at {s.url} ({_describe(s, exc)}) {tried}: check S3_ENDPOINT "
            "(or AWS_ENDPOINT_URL / MINIO_ENDPOINT), S3_USE_TLS and the network")
    elif isinstance(exc, Mismatch):
        kind, text = IntegrityError, f"{what}: {exc} ({tried})"
    elif s.access_key is None:
        # Some stores (SeaweedFS) answer an unsigned request with a server error, not 403.
        kind, text = AccessDeniedError, (
            f"{what}: {s.url} answered {_describe(s, exc)} to an anonymous request {tried}: no credentials are set; "
            "put them in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or MINIO_ACCESS_KEY / MINIO_SECRET_KEY)")
    else:
        kind, text = TransferError, (f"{what}: still failing {tried}: {_describe(s, exc)}; run it again to resume "
                                     "(what landed is kept and skipped)")
    return kind(s.redact(text))


def with_retries(s: S3Settings, what: str, fn: Callable[[], Any]) -> Any:
    """fn(), retried on transient errors: delays of ``backoff`` doubling (plus up to ``backoff``
    of jitter, at most 30 s), ``retries`` attempts at most, and none that would start after
    ``retry_deadline``. A permanent error is raised at once, translated."""
    start = time.monotonic()
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(s.retries) | tenacity.stop_before_delay(s.retry_deadline),
        wait=tenacity.wait_exponential_jitter(initial=s.backoff, max=30.0, jitter=s.backoff),
        before_sleep=lambda state: log.warning(
            "%s: %s; retry %d of %d in %.1fs", what, _describe(s, state.outcome.exception()), state.attempt_number,
            s.retries - 1, state.next_action.sleep),
    )
    try:
        return retrying(fn)
    except tenacity.RetryError as stopped:
        last = stopped.last_attempt
        raise _give_up(s, what, last.exception(), last.attempt_number, time.monotonic() - start) from None
    except Exception as exc:
        mapped = _translate(s, what, exc)
        if mapped is exc:
            raise
        raise mapped from None

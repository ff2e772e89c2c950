"""Where the store is and how to talk to it, read once from the environment.

Parsed by hand rather than with a settings library: the variables have aliases read in a
fixed order (``S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``...), an endpoint URL decides TLS, and a
URL holding credentials is refused without echoing them; a dependency such as
pydantic-settings would add pydantic to the Ascend image and still need these rules written out.
"""
import math
import os
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from hrnet.storage.errors import ConfigError

MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's smallest multipart part
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


def env_number(env, name: str, default, kind=float, minimum=None):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):  # NaN passes every comparison; inf overflows the timers that use it
        raise ConfigError(f"{name} must be a finite number, not {raw}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {raw}")
    return value


def settings_from_env(env=None) -> S3Settings:
    """S3Settings from the environment variables listed in hrnet.storage's docstring."""
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
        workers=env_number(env, "HRNET_S3_WORKERS", 8, int, 1),
        part_size=env_number(env, "HRNET_S3_PART_SIZE", 64 * MIB, int, MIN_PART_SIZE),
        connect_timeout=env_number(env, "HRNET_S3_CONNECT_TIMEOUT", 5.0, float, 0.1),
        read_timeout=env_number(env, "HRNET_S3_READ_TIMEOUT", 60.0, float, 0.1),
        retries=env_number(env, "HRNET_S3_RETRIES", 5, int, 1),
        retry_deadline=env_number(env, "HRNET_S3_RETRY_DEADLINE", 120.0, float, 0.0),
        backoff=env_number(env, "HRNET_S3_BACKOFF", 0.5, float, 0.0),
    )

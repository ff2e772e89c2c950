"""Outages during transfers. The client talks to the S3 server through a localhost TCP
proxy (tests/s3server.TcpProxy) that the tests cut and restore: the server "goes down and
comes back" mid-transfer without losing what it already stored, or answers 503 SlowDown.
Transfers either complete after retries or fail cleanly; a re-run completes with every
object verified; a reader never takes a half-written output for a complete one."""
import logging
import os
import re
import shutil
import time

import pytest
from helpers import make_output, tree
from s3server import TcpProxy

from hrnet import storage
from hrnet.errors import IncompleteError

BIG = (5 << 20) + 100_000  # two multipart parts at the tests' 5 MiB part size


@pytest.fixture(scope="module")
def s3_server(every_server):
    """Every test here runs against SeaweedFS, moto and MinIO's gateway code."""
    return every_server


@pytest.fixture
def proxy(s3_env, monkeypatch):
    host, port = s3_env.server.host_port
    proxy = TcpProxy(host, port).start()
    monkeypatch.setenv("S3_ENDPOINT", proxy.endpoint)
    # Enough patience to ride out the short outages below: 0.1 + 0.2 + 0.4 + ... seconds.
    monkeypatch.setenv("HRNET_S3_RETRIES", "7")
    monkeypatch.setenv("HRNET_S3_BACKOFF", "0.1")
    yield proxy
    proxy.stop()


def direct(monkeypatch, s3_env):
    """Talk to the server itself again (a reader elsewhere), not through the proxy."""
    monkeypatch.setenv("S3_ENDPOINT", s3_env.server.endpoint)


def test_upload_rides_out_an_outage(proxy, s3_env, tmp_path, caplog, monkeypatch):
    src = make_output(str(tmp_path / "src"), shards=6, size=300_000, big=BIG)
    uri = s3_env.uri("ds")
    caplog.set_level(logging.INFO, logger="hrnet.storage")
    proxy.cut_after(3_000_000, restore_after=0.4)  # in the middle of the transfer
    stats = storage.upload(src, uri)
    assert proxy.cuts == 1 and re.search(r"retry \d of 6", caplog.text)
    assert stats.transferred == 9
    direct(monkeypatch, s3_env)
    assert tree(storage.local_input(uri)) == tree(src)  # every object verified against the manifest


def test_failed_republish_is_incomplete_and_a_rerun_completes(proxy, s3_env, tmp_path, monkeypatch, caplog):
    uri = s3_env.uri("ds")
    v1 = make_output(str(tmp_path / "v1"), seed=1, shards=4, size=200_000, labels="v1")
    storage.upload(v1, uri)
    v2 = make_output(str(tmp_path / "v2"), seed=2, shards=6, size=200_000, big=BIG, labels="v2")

    monkeypatch.setenv("HRNET_S3_RETRIES", "3")
    # One file at a time, cut in train-00001 (sorted order: big.bin, labels.txt, train-00000,
    # ...), so that some files surely landed before the outage however the threads are scheduled.
    monkeypatch.setenv("HRNET_S3_WORKERS", "1")
    proxy.cut_after(BIG + 300_000)  # down for good
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="run it again|cannot reach") as info:
        with storage.local_output(uri) as out:
            shutil.copytree(v2, out, dirs_exist_ok=True)  # the step writes v2
    assert time.monotonic() - started < 30
    assert isinstance(info.value, (storage.TransferError, storage.EndpointUnreachableError))

    # Neither v1 (partly overwritten) nor v2 (partly written): incomplete, for any reader.
    direct(monkeypatch, s3_env)
    landed = storage.list_files(uri)
    assert "manifest.json" not in landed
    with pytest.raises(IncompleteError, match="incomplete"):
        storage.local_input(uri)

    proxy.restore()  # the server is back: the same step runs again
    monkeypatch.setenv("S3_ENDPOINT", proxy.endpoint)
    caplog.set_level(logging.INFO, logger="hrnet.storage")
    with storage.local_output(uri) as out:
        shutil.copytree(v2, out, dirs_exist_ok=True)
    uploaded, total = map(int, re.search(r"uploading (\d+) of (\d+) files", caplog.text).groups())
    assert uploaded < total  # what landed before the outage was verified and kept
    direct(monkeypatch, s3_env)
    assert tree(storage.local_input(uri, cache_dir=str(tmp_path / "reader"))) == tree(v2)


def test_slowdown_is_retried(proxy, s3_env, tmp_path, caplog):
    src = make_output(str(tmp_path / "src"))
    caplog.set_level(logging.WARNING, logger="hrnet.storage")
    storage.upload(src, s3_env.uri("a"))
    proxy.fail_next(3)
    storage.write_text(s3_env.uri("a/note.txt"), "slow")
    assert proxy.failed == 3 and "SlowDown (HTTP 503)" in caplog.text
    assert storage.read_text(s3_env.uri("a/note.txt")) == "slow"


def test_endless_slowdown_gives_up_cleanly(proxy, s3_env, monkeypatch):
    monkeypatch.setenv("HRNET_S3_RETRIES", "3")
    proxy.fail_next(1000)
    with pytest.raises(storage.TransferError, match=r"still failing after 3 attempts .*SlowDown"):
        storage.write_text(s3_env.uri("a/note.txt"), "slow")


def test_download_interrupted_then_resumed(proxy, s3_env, tmp_path, monkeypatch):
    v1 = make_output(str(tmp_path / "v1"), shards=6, size=300_000, big=BIG, seed=1, labels="v1")
    uri = s3_env.uri("ds")
    storage.upload(v1, uri)
    proxy.cut_after(3_000_000, restore_after=0.4, down=True)
    local = storage.local_input(uri)
    assert proxy.cuts == 1 and tree(local) == tree(v1)

    v2 = make_output(str(tmp_path / "v2"), shards=6, size=300_000, big=BIG, seed=2, labels="v2")
    storage.upload(v2, uri, delete=True)
    monkeypatch.setenv("HRNET_S3_RETRIES", "2")
    monkeypatch.setenv("HRNET_S3_WORKERS", "1")  # cut in train-00001, after big.bin and train-00000 arrived
    proxy.cut_after(BIG + 450_000, down=True)  # down for good while the cache is being updated to v2
    with pytest.raises(storage.StorageError):
        storage.local_input(uri)
    assert not os.path.exists(os.path.join(local, "manifest.json"))  # a half-updated cache is not "complete"
    proxy.restore()
    stats = storage.download(uri, local)
    assert stats.skipped > 0 and tree(local) == tree(v2)  # what arrived before the cut was verified and kept


def test_a_failed_parallel_transfer_says_so_in_one_line(caplog):
    """One failure cancels what has not started; the cancelled transfers are no failures of
    their own (each printed an empty `also failed:` line: 2,249 of them for a 3,000-object
    download), and those that failed at the same time are counted in one line."""
    import threading
    from types import SimpleNamespace

    from hrnet.storage import objects

    started = threading.Barrier(4)

    def fails_together():
        started.wait(timeout=10)  # four fail while running side by side
        raise OSError("No space left on device")

    tasks = [fails_together] * 4 + [lambda: time.sleep(0.01)] * 3000
    with caplog.at_level(logging.ERROR, logger="hrnet.storage"), pytest.raises(OSError, match="No space left"):
        objects.parallel(SimpleNamespace(workers=4), tasks)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["3 more transfer(s) failed at the same time, e.g. No space left on device"], lines[:5]

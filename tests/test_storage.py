"""hrnet.storage over HTTP against real S3 servers (SeaweedFS, moto's server mode and MinIO's
gateway code, or the store named by HRNET_TEST_S3_ENDPOINT): every operation, integrity,
sync, atomic publish, bad input."""
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
import traceback

import pytest
from helpers import make_output, tree
from s3server import ACCESS_KEY, SECRET_KEY, MotoProcess, apply_env, env_for

from hrnet import storage
from hrnet.errors import HrnetError, IncompleteError
from hrnet.fileio import PARTIAL_SUFFIX
from hrnet.manifest import file_entry, read_manifest, write_manifest
from hrnet.storage import objects


@pytest.fixture(scope="module")
def s3_server(every_server):
    """Every test here runs against SeaweedFS, moto and MinIO's gateway code."""
    return every_server


# ---------------------------------------------------------------- settings and URIs (no server)

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_numbers_from_the_environment_must_be_finite(value, monkeypatch):
    """HRNET_LEASE_TTL=nan made the lease thread renew in a busy loop (NaN passes every
    comparison) and inf overflowed its timer: both are refused where they are read."""
    from hrnet.storage import lease

    with pytest.raises(storage.ConfigError, match="HRNET_S3_READ_TIMEOUT must be a finite number"):
        storage.settings_from_env({"HRNET_S3_READ_TIMEOUT": value})
    monkeypatch.setenv("HRNET_LEASE_TTL", value)
    with pytest.raises(storage.ConfigError, match="HRNET_LEASE_TTL must be a finite number"):
        lease._lease_ttl()


def test_settings_from_env_endpoint_forms_tls_and_credentials():
    s = storage.settings_from_env({"S3_ENDPOINT": "http://minio.kubeflow:9000", "AWS_ACCESS_KEY_ID": "ak12",
                                   "AWS_SECRET_ACCESS_KEY": "sk-very-secret"})
    assert (s.endpoint, s.secure, s.access_key) == ("minio.kubeflow:9000", False, "ak12")
    assert "sk-very-secret" not in repr(s) and "ak12" not in repr(s)
    assert storage.settings_from_env({"MINIO_ENDPOINT": "minio:9000"}).secure is True
    assert storage.settings_from_env({"AWS_ENDPOINT_URL": "https://s3.example.com"}).endpoint == "s3.example.com"
    forced = storage.settings_from_env({"S3_ENDPOINT": "https://x:9000", "S3_USE_TLS": "false"})
    assert forced.secure is False
    s = storage.settings_from_env({"MINIO_ACCESS_KEY": "mk12", "MINIO_SECRET_KEY": "ms12", "AWS_REGION": "eu-x-1",
                                   "HRNET_S3_PART_SIZE": str(8 << 20)})
    assert (s.access_key, s.secret_key, s.region, s.part_size) == ("mk12", "ms12", "eu-x-1", 8 << 20)
    assert storage.settings_from_env({}).endpoint == "s3.amazonaws.com"


@pytest.mark.parametrize("env, words", [
    ({"S3_ENDPOINT": "http://user:pw-123456@minio:9000"}, "holds credentials"),
    ({"S3_ENDPOINT": "ftp://minio"}, "not a ftp:// URL"),
    ({"S3_ENDPOINT": "http://minio:9000/bucket"}, "without a path"),
    ({"S3_USE_TLS": "maybe"}, "S3_USE_TLS must be true or false"),
    ({"HRNET_S3_PART_SIZE": "1000"}, "at least"),
    ({"HRNET_S3_RETRIES": "many"}, "must be a number"),
    ({"AWS_ACCESS_KEY_ID": "ak-only"}, "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
])
def test_settings_errors_name_the_variable(env, words):
    with pytest.raises(storage.ConfigError, match=words) as info:
        storage.settings_from_env(env)
    assert "pw-123456" not in str(info.value)


def test_uris():
    assert storage.split_uri("s3://bucket/a//b/") == ("bucket", "a/b")
    assert storage.split_uri("minio://mlpipeline") == ("mlpipeline", "")
    assert storage.is_remote("minio://b/x") and not storage.is_remote("/data/x")
    for uri, words in [("gs://bucket/x", "unknown scheme gs://"), ("s3://", "no bucket"), ("s3:///x", "no bucket"),
                       ("s3://Bad_Bucket/x", "invalid bucket name"), ("s3://bucket/a/../b", "not allowed")]:
        with pytest.raises(storage.BadUriError, match=words):
            storage.split_uri(uri)
    with pytest.raises(storage.BadUriError, match="unknown scheme"):
        storage.local_input("hdfs://nn/data")
    with pytest.raises(storage.BadUriError, match="unknown scheme"):
        with storage.local_output("gs://bucket/out"):
            pass


# ---------------------------------------------------------------- local paths

def test_local_paths(tmp_path):
    src = make_output(str(tmp_path / "src"))
    assert storage.local_input(src) == src
    assert storage.local_input("file://" + src) == src
    with storage.local_output(str(tmp_path / "out")) as out:
        assert out == str(tmp_path / "out") and os.path.isdir(out)
    assert storage.mirror(src, src).transferred == 0
    stats = storage.mirror(src, str(tmp_path / "copy"))
    assert stats.transferred == 5 and tree(str(tmp_path / "copy")) == tree(src)
    assert storage.mirror(src, str(tmp_path / "copy")).skipped == 5
    assert storage.restore(str(tmp_path / "nothing-here"), str(tmp_path / "r")).files == 0
    storage.write_text(str(tmp_path / "d" / "x.txt"), "hi")
    assert storage.read_text(str(tmp_path / "d" / "x.txt")) == "hi"
    assert storage.exists(src) and not storage.exists(str(tmp_path / "nope"))
    assert storage.list_files(src) == sorted(tree(src))


# ---------------------------------------------------------------- operations over HTTP

def test_small_files_exists_and_list(s3_env):
    storage.write_text(s3_env.uri("a/b/hello.txt"), "hello")
    storage.write_bytes(s3_env.uri("a/c.bin"), b"\x00\x01")
    assert storage.read_text(s3_env.uri("a/b/hello.txt")) == "hello"
    assert storage.read_bytes(s3_env.uri("a/c.bin", scheme="minio")) == b"\x00\x01"  # minio:// is the same store
    assert storage.exists(s3_env.uri("a/b/hello.txt"))
    assert storage.exists(s3_env.uri("a/b"))  # a "folder"
    assert storage.exists(s3_env.uri())  # the bucket
    assert not storage.exists(s3_env.uri("a/b/nope.txt"))
    assert not storage.exists(s3_env.uri("a/b/hell"))  # a prefix of a name is not a folder
    assert storage.list_files(s3_env.uri("a")) == ["b/hello.txt", "c.bin"]
    assert storage.list_files(s3_env.uri("empty")) == []
    stat = s3_env.client().stat_object(s3_env.bucket, "a/b/hello.txt")
    assert stat.metadata.get("x-amz-meta-sha256") == hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(storage.ObjectNotFoundError, match="no such object") as info:
        storage.read_bytes(s3_env.uri("a/missing.txt"))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, HrnetError)


def test_upload_download_sync_multipart_and_checksums(s3_env, tmp_path):
    src = make_output(str(tmp_path / "src"), big=(5 << 20) + 4096)  # over the 5 MiB part size
    uri = s3_env.uri("sets/demo")
    stats = storage.upload(src, uri)
    assert (stats.transferred, stats.skipped) == (6, 0)
    client = s3_env.client()
    big = client.stat_object(s3_env.bucket, "sets/demo/big.bin")
    assert big.etag.strip('"').endswith("-2")  # two parts: a multipart upload
    for rel, digest in tree(src).items():
        stat = client.stat_object(s3_env.bucket, "sets/demo/" + rel)
        assert stat.metadata.get("x-amz-meta-sha256") == digest

    again = storage.upload(src, uri)
    assert (again.transferred, again.skipped) == (0, 6)  # all present and equal

    with open(os.path.join(src, "train-00001-of-00003"), "ab") as f:
        f.write(b"more")
    write_manifest(src, {"kind": "tfrecords", "shards": [
        file_entry(os.path.join(src, n), src) for n in sorted(os.listdir(src)) if n.startswith(("train", "big"))]})
    changed = storage.upload(src, uri)
    assert changed.transferred == 2 and changed.skipped == 4  # the shard and the manifest

    dest = str(tmp_path / "dest")
    got = storage.download(uri, dest)
    assert got.transferred == 5 and tree(dest) == tree(src)
    assert storage.download(uri, dest).transferred == 0
    with open(os.path.join(dest, "labels.txt"), "w") as f:
        f.write("tampered\n")
    open(os.path.join(dest, "stale.txt"), "w").close()
    fixed = storage.download(uri, dest, delete=True)
    assert fixed.transferred == 1 and fixed.deleted == 1 and tree(dest) == tree(src)

    copy = s3_env.uri("sets/copy")
    storage.sync(uri, copy)
    assert storage.list_files(copy) == storage.list_files(uri)
    os.remove(os.path.join(src, "labels.txt"))
    pruned = storage.sync(src, uri, delete=True)
    assert pruned.deleted == 1 and "labels.txt" not in storage.list_files(uri)


def test_local_input_verifies_and_reuses_its_cache(s3_env, tmp_path, caplog):
    src = make_output(str(tmp_path / "src"))
    uri = s3_env.uri("ds")
    with storage.local_output(uri) as out:
        make_output(out)
    local = storage.local_input(uri)
    assert local.startswith(s3_env.env["HRNET_CACHE_DIR"]) and tree(local) == tree(src)
    assert read_manifest(local)["kind"] == "tfrecords"

    shard = os.path.join(local, "train-00000-of-00003")
    before = os.stat(shard).st_mtime_ns
    caplog.set_level(logging.INFO, logger="hrnet.storage")
    assert storage.local_input(uri) == local
    assert "using the verified local copy" in caplog.text
    assert os.stat(shard).st_mtime_ns == before  # reused, not downloaded again

    with open(shard, "r+b") as f:  # same size, different bytes: only the checksum tells
        f.write(b"\xff\xfe")
    caplog.clear()
    assert storage.local_input(uri) == local
    assert "downloading 1 of 4 files" in caplog.text and tree(local) == tree(src)

    labels = os.path.join(local, "labels.txt")  # no manifest entry: checked against the object's sha256
    with open(labels, "r+b") as f:
        f.write(b"9")
    caplog.clear()
    assert storage.local_input(uri) == local
    assert "downloading 1 of 4 files" in caplog.text and tree(local) == tree(src)

    other = storage.local_input(uri, cache_dir=str(tmp_path / "elsewhere"))
    assert other.startswith(str(tmp_path / "elsewhere")) and tree(other) == tree(src)


def test_corrupt_object_is_an_integrity_error(s3_env, tmp_path):
    import io

    src = make_output(str(tmp_path / "src"))
    uri = s3_env.uri("ds")
    storage.upload(src, uri)
    size = os.path.getsize(os.path.join(src, "train-00002-of-00003"))
    s3_env.client().put_object(s3_env.bucket, "ds/train-00002-of-00003", io.BytesIO(b"x" * size), size)
    with pytest.raises(storage.IntegrityError, match="train-00002-of-00003.*sha256"):
        storage.local_input(uri)
    s3_env.client().put_object(s3_env.bucket, "ds/labels.txt", io.BytesIO(b"x"), 1)  # no checksum: size only
    s3_env.client().put_object(s3_env.bucket, "ds/train-00001-of-00003", io.BytesIO(b"short"), 5)
    with pytest.raises(storage.IntegrityError, match="5 bytes, but its manifest.json entry says"):
        storage.local_input(uri)


def test_atomic_publish_and_incomplete_outputs(s3_env, tmp_path, monkeypatch):
    uri = s3_env.uri("out/ds")
    with pytest.raises(RuntimeError):
        with storage.local_output(uri) as out:
            make_output(out)
            raise RuntimeError("the step failed")
    assert storage.list_files(uri) == []  # nothing published
    assert "train-00000-of-00003" in os.listdir(storage.cache_path(uri))  # but kept for a re-run to resume from

    with storage.local_output(s3_env.uri("out/other")) as out:  # a step that forgot its manifest
        with open(os.path.join(out, "part-0"), "w") as f:
            f.write("x")
    with pytest.raises(IncompleteError, match="has no manifest.json: it is incomplete"):
        storage.local_input(s3_env.uri("out/other"))
    with pytest.raises(storage.ObjectNotFoundError, match="does not exist"):
        storage.local_input(s3_env.uri("never/written"))

    # Order of a republish: old manifest removed first, data, the checkpoint pointer, new manifest last.
    v1 = make_output(str(tmp_path / "v1"), seed=1)
    storage.upload(v1, uri, delete=True)
    calls = []
    put, remove = objects.put_file, objects.remove_object
    monkeypatch.setattr(objects, "put_file", lambda s, b, key, *a: calls.append(("put", key)) or put(s, b, key, *a))
    monkeypatch.setattr(objects, "remove_object", lambda s, b, key: calls.append(("del", key)) or remove(s, b, key))
    with storage.local_output(uri) as out:
        shutil.rmtree(out)  # the step starts afresh (the failed attempt's files are still there)
        make_output(out, seed=2, shards=2)
        with open(os.path.join(out, "checkpoint"), "w") as f:
            f.write('model_checkpoint_path: "ckpt-2"\n')
    # The writer's lease (and on a store that ignores conditional writes, its claim) aside.
    calls = [c for c in calls if not storage.is_control(c[1][len("out/ds/"):])]
    keys = [key.rsplit("/", 1)[-1] for _, key in calls]
    assert calls[0] == ("del", "out/ds/manifest.json")
    assert calls[-1] == ("put", "out/ds/manifest.json")
    assert sorted(calls[-4:-1]) == [("del", f"out/ds/train-0000{i}-of-00003") for i in range(3)]  # v1's shards
    assert keys.index("checkpoint") > max(keys.index(n) for n in ("train-00000-of-00002", "train-00001-of-00002"))
    assert "labels.txt" not in keys  # equal in v1 and v2: skipped
    assert storage.list_files(uri) == ["checkpoint", "labels.txt", "manifest.json", "train-00000-of-00002",
                                       "train-00001-of-00002"]


def test_local_output_rejects_a_manifest_that_does_not_match(s3_env):
    with pytest.raises(storage.IntegrityError, match="does not match its manifest.json entry"):
        with storage.local_output(s3_env.uri("bad")) as out:
            make_output(out)
            with open(os.path.join(out, "train-00000-of-00003"), "ab") as f:
                f.write(b"written after the manifest")
    assert storage.list_files(s3_env.uri("bad")) == []


def test_mirror_and_restore_a_checkpoint_folder(s3_env, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    uri = s3_env.uri("runs/r1")

    def save(step):
        with open(os.path.join(run, f"ckpt-{step}.index"), "wb") as f:
            f.write(os.urandom(100))
        with open(os.path.join(run, f"ckpt-{step}.data-00000-of-00001"), "wb") as f:
            f.write(os.urandom(2000))
        with open(os.path.join(run, "checkpoint"), "w") as f:
            f.write(f'model_checkpoint_path: "ckpt-{step}"\n')

    save(1)
    # What a writer killed mid-write leaves (hrnet.fileio's partial file) is never uploaded.
    partial = os.path.join(run, "history.jsonl" + PARTIAL_SUFFIX)
    with open(partial, "w") as f:
        f.write('{"step": 1, "lo')
    assert storage.mirror(run, uri).transferred == 3
    assert "history.jsonl" + PARTIAL_SUFFIX not in storage.list_files(uri)
    os.remove(partial)
    save(2)
    stats = storage.mirror(run, uri)
    assert (stats.transferred, stats.skipped) == (3, 2)
    for name in ("ckpt-1.index", "ckpt-1.data-00000-of-00001"):
        os.remove(os.path.join(run, name))
    assert storage.mirror(run, uri, delete=True).deleted == 2
    assert storage.list_files(uri) == ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]

    other = str(tmp_path / "other-node")
    restored = storage.restore(uri, other)
    assert restored.transferred == 3 and tree(other) == tree(run)
    assert storage.restore(uri, other).transferred == 0
    assert storage.restore(s3_env.uri("runs/never"), str(tmp_path / "fresh")).files == 0


def test_concurrent_reader_never_sees_a_mixed_data_set(s3_env, tmp_path):
    """While v2 replaces v1, a reader gets v1 whole, v2 whole, or IncompleteError."""
    uri = s3_env.uri("live")
    # labels.txt differs too: it has no manifest entry, so only the final manifest check protects it.
    v1 = make_output(str(tmp_path / "v1"), seed=1, shards=6, labels="v1")
    v2 = make_output(str(tmp_path / "v2"), seed=2, shards=6, labels="v2")
    storage.upload(v1, uri)
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.append(tree(storage.local_input(uri, cache_dir=str(tmp_path / "reader"))))
            except IncompleteError:
                seen.append("incomplete")
            except Exception as exc:  # anything else fails the test below
                seen.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    try:  # republish until the reader has met both a complete and an incomplete data set
        for _ in range(40):
            storage.upload(v2, uri, delete=True)
            storage.upload(v1, uri, delete=True)
            if "incomplete" in seen and any(result in (tree(v1), tree(v2)) for result in seen):
                break
    finally:
        stop.set()
        reader.join()
    assert "incomplete" in seen and any(result in (tree(v1), tree(v2)) for result in seen)
    for result in seen:
        assert result in ("incomplete", tree(v1), tree(v2))


def test_reader_is_not_fooled_by_a_republish_back_to_the_same_manifest(s3_env, tmp_path, monkeypatch):
    """v1 -> v2 -> v1 while a reader is in the middle: its manifest looks unchanged at the
    end, but the labels.txt it fetched (no manifest entry) came from v2."""
    uri = s3_env.uri("aba")
    v1 = make_output(str(tmp_path / "v1"), seed=1, labels="v1")
    v2 = make_output(str(tmp_path / "v2"), seed=2, labels="v2")
    storage.upload(v1, uri)
    real_get = objects.get_file

    def get_during_republish(s, bucket, key, *args, **kwargs):
        if not key.endswith("labels.txt"):
            return real_get(s, bucket, key, *args, **kwargs)
        storage.upload(v2, uri, delete=True)
        try:
            return real_get(s, bucket, key, *args, **kwargs)
        finally:
            storage.upload(v1, uri, delete=True)

    monkeypatch.setattr(objects, "get_file", get_during_republish)
    with pytest.raises(IncompleteError, match="republished"):
        storage.local_input(uri)
    monkeypatch.setattr(objects, "get_file", real_get)
    assert tree(storage.local_input(uri)) == tree(v1)


# ---------------------------------------------------------------- bad input: clear errors in bounded time

def test_missing_bucket(s3_env, tmp_path, monkeypatch):
    src = make_output(str(tmp_path / "src"))
    for region in (None, "us-east-1"):  # with a region, S3 answers a plain 404 to some requests
        if region:
            monkeypatch.setenv("AWS_REGION", region)
        for call in (lambda: storage.local_input("s3://no-such-bucket-hrnet/ds"),
                     lambda: storage.upload(src, "s3://no-such-bucket-hrnet/ds"),
                     lambda: storage.read_bytes("s3://no-such-bucket-hrnet/x.txt"),
                     lambda: storage.local_output("s3://no-such-bucket-hrnet/out").__enter__()):
            with pytest.raises(storage.BucketNotFoundError, match="no bucket 'no-such-bucket-hrnet'"):
                call()


@pytest.fixture(scope="module")
def auth_server():
    """moto in a subprocess, checking signatures (wrong credentials are refused)."""
    moto = MotoProcess(auth=True)
    server = moto.start()
    server.client().make_bucket("authed")
    yield server
    moto.stop()


def test_wrong_credentials(auth_server, monkeypatch, tmp_path):
    apply_env(monkeypatch, env_for(auth_server, str(tmp_path / "cache")))
    storage.write_text("s3://authed/ok.txt", "fine")  # the right key works
    assert storage.read_text("s3://authed/ok.txt") == "fine"
    for key, secret in ((auth_server.access_key, "wrong-secret-8b2f61d0"), ("AKIAUNKNOWN000000000", "whatever-123")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        for call in (lambda: storage.read_text("s3://authed/ok.txt"), lambda: storage.list_files("s3://authed/"),
                     lambda: storage.local_output("s3://authed/out").__enter__()):
            started = time.monotonic()
            with pytest.raises(storage.AccessDeniedError, match="access denied .* AWS_SECRET_ACCESS_KEY") as info:
                call()
            assert time.monotonic() - started < 10  # refused at once, not retried
            assert secret not in str(info.value) and key not in str(info.value)


def test_unreachable_endpoint_fails_within_the_retry_budget(s3_env, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HRNET_S3_RETRIES", "3")
    started = time.monotonic()
    with pytest.raises(storage.EndpointUnreachableError, match=r"cannot reach .* after 3 attempts.* S3_ENDPOINT"):
        storage.local_input(f"s3://{s3_env.bucket}/ds")
    assert time.monotonic() - started < 10


def test_endpoint_that_never_answers_times_out(s3_env, monkeypatch):
    silent = socket.socket()  # accepts connections (the kernel does), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        monkeypatch.setenv("S3_ENDPOINT", "127.0.0.1:%d" % silent.getsockname()[1])
        monkeypatch.setenv("S3_USE_TLS", "false")
        monkeypatch.setenv("HRNET_S3_READ_TIMEOUT", "0.3")
        monkeypatch.setenv("HRNET_S3_RETRIES", "2")
        started = time.monotonic()
        with pytest.raises(storage.TransferError, match="still failing after 2 attempts.*ReadTimeout"):
            storage.list_files(f"s3://{s3_env.bucket}/ds")
        assert time.monotonic() - started < 10
    finally:
        silent.close()


def test_tls_against_a_plain_http_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("S3_USE_TLS", "true")
    with pytest.raises(storage.ConfigError, match="TLS with https://.* S3_USE_TLS=false"):
        storage.list_files(s3_env.uri("ds"))


def test_no_secret_in_any_log_line_or_error(s3_env, auth_server, tmp_path, monkeypatch, caplog, capfd):
    """Run the operations, good and failing, with every logger at DEBUG; search the logs,
    the progress output, the messages and the tracebacks for every credential value."""
    caplog.set_level(logging.DEBUG)
    texts = []

    def attempt(call):
        try:
            call()
        except Exception as exc:
            assert isinstance(exc, (HrnetError, ValueError, FileNotFoundError)), repr(exc)
            texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))])

    src = make_output(str(tmp_path / "src"), big=(5 << 20) + 10)
    uri = s3_env.uri("ds")
    attempt(lambda: storage.upload(src, uri))
    attempt(lambda: storage.local_input(uri))
    attempt(lambda: storage.mirror(src, uri))
    attempt(lambda: storage.read_text(s3_env.uri("missing.txt")))
    attempt(lambda: storage.local_input("s3://no-such-bucket-hrnet/x"))
    attempt(lambda: storage.local_input(s3_env.uri("nothing")))
    texts.append(repr(storage.settings_from_env()))
    monkeypatch.setenv("S3_ENDPOINT", "http://127.0.0.1:9")
    attempt(lambda: storage.list_files(uri))
    monkeypatch.setenv("S3_ENDPOINT", f"http://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:9")
    attempt(lambda: storage.list_files(uri))

    wrong = "wrong-secret-0d9e3c7a"
    apply_env(monkeypatch, env_for(auth_server, str(tmp_path / "cache2")))
    attempt(lambda: storage.write_text("s3://authed/x.txt", "x"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    attempt(lambda: storage.read_text("s3://authed/x.txt"))
    attempt(lambda: storage.upload(src, "s3://authed/ds"))

    out, err = capfd.readouterr()
    texts += [out, err, caplog.text] + [r.getMessage() for r in caplog.records]
    assert len(texts) > 20 and any("access denied" in t for t in texts)
    everything = "\n".join(texts)
    for secret in (ACCESS_KEY, SECRET_KEY, auth_server.access_key, auth_server.secret_key, wrong):
        assert secret not in everything

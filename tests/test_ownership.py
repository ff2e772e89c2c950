"""An output owns its prefix or folder: nothing a step did not write is ever deleted or
overwritten, and two writers cannot work on one output. Against SeaweedFS and moto, with
the `hrnet` commands a user runs (in-process through hrnet.cli.main, so each case is one
exit code and one line)."""
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import TINY_CONFIG, kill_when, make_output, write_images

from hrnet import cli, storage
from hrnet.manifest import read_manifest, write_manifest
from hrnet.storage import objects as storage_objects

UNRELATED = {"precious/a.txt": b"not ours", "README": b"someone's notes", "other-run/ckpt-1.index": b"x" * 10}


@pytest.fixture(scope="module")
def s3_server(every_server):
    """Every test here runs against SeaweedFS, moto and MinIO's gateway code."""
    return every_server


def put_unrelated(s3_env, prefix=""):
    client = s3_env.client()
    for name, data in UNRELATED.items():
        import io

        client.put_object(s3_env.bucket, (prefix + "/" if prefix else "") + name, io.BytesIO(data), len(data))


def objects(s3_env):
    """Every object of the test's bucket, by name. One listed but gone when read is left out:
    a writer's lease probe or claim lives a few requests."""
    from minio.error import S3Error

    client = s3_env.client()
    found = {}
    for o in client.list_objects(s3_env.bucket, recursive=True):
        try:
            found[o.object_name] = client.get_object(s3_env.bucket, o.object_name).read()
        except S3Error as exc:
            if exc.code != "NoSuchKey":
                raise
    return found


def objects_under(s3_env, prefix, control=False):
    """The names under ``prefix``; the control files (owner marker, lease) only with ``control``."""
    names = [n[len(prefix) + 1:] for n in objects(s3_env) if n.startswith(prefix + "/")]
    return [n for n in names if control or n not in storage.CONTROL_FILES]


def hrnet(capsys, *argv):
    """(exit code, stderr) of one `hrnet` command run in this process."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("hrnet ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ the bucket and its prefixes

def test_a_bare_bucket_is_refused_and_keeps_every_object(s3_env, capsys, tmp_path):
    put_unrelated(s3_env)
    before = objects(s3_env)
    write_images(str(tmp_path / "src"))
    for argv in (["demo-data", "--out", s3_env.uri()], ["demo-data", "--out", s3_env.uri() + "/"],
                 ["convert", "--src", tmp_path / "src", "--out", s3_env.uri()]):
        code, err = hrnet(capsys, *argv)
        assert code == 2 and "bare bucket" in error_line(err), err
    with pytest.raises(storage.BadUriError, match="bare bucket"):
        storage.mirror(str(tmp_path / "src"), s3_env.uri(), delete=True)
    assert objects(s3_env) == before


def test_a_crowded_prefix_is_refused_and_keeps_every_object(s3_env, capsys, tmp_path):
    put_unrelated(s3_env, "exp")
    before = objects(s3_env)
    code, err = hrnet(capsys, "demo-data", "--out", s3_env.uri("exp"))
    line = error_line(err)
    assert code == 2 and "not empty" in line and "3 files" in line and "README" in line, line
    with pytest.raises(storage.OwnershipError):
        with storage.local_output(s3_env.uri("exp"), kind="checkpoint"):
            pass
    assert objects(s3_env) == before

    # The same for a local folder that holds something else.
    folder = tmp_path / "crowded"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    code, err = hrnet(capsys, "demo-data", "--out", folder)
    assert code == 2 and "thesis.tex" in error_line(err)
    assert os.listdir(folder) == ["thesis.tex"]


def test_a_republish_deletes_only_what_the_output_wrote(s3_env, tmp_path):
    uri = s3_env.uri("ds")
    with storage.local_output(uri, kind="tfrecords") as out:
        make_output(out, shards=3, seed=1)
    put_unrelated(s3_env, "ds")  # someone drops files into the published output
    storage_objects.transferred.clear()  # a new process: it knows only what the manifest lists
    with storage.local_output(uri, kind="tfrecords") as out:
        for name in os.listdir(out):
            if name.startswith("train-"):
                os.remove(os.path.join(out, name))
        os.remove(os.path.join(out, "manifest.json"))
        make_output(out, shards=2, seed=2)
    names = set(objects(s3_env))
    assert {"ds/" + n for n in UNRELATED} <= names  # theirs: kept
    assert "ds/train-00000-of-00003" not in names  # ours, replaced: gone
    assert {"ds/train-00000-of-00002", "ds/train-00001-of-00002", "ds/manifest.json"} <= names


def test_caches_of_a_prefix_and_its_child_never_nest(s3_env):
    parent, child = storage.cache_path(s3_env.uri("a")), storage.cache_path(s3_env.uri("a/x"))
    assert not child.startswith(parent + os.sep) and os.path.dirname(parent) == os.path.dirname(child)


def test_a_reader_on_the_writers_machine_never_touches_what_the_writer_has_not_published(s3_env):
    """evaluate --checkpoint s3://.../run7 while `hrnet train --out s3://.../run7` runs on the
    same machine: the reader's download deleted what the trainer had written but not yet
    mirrored (a published history cut by 170 steps, an events file gone). A reader copies
    into a folder of its own."""
    uri = s3_env.uri("run7")
    with storage.local_output(uri, kind="checkpoint") as out:
        make_output(out, kind="checkpoint", shards=2, seed=1)  # a finished run, published
    with storage.local_output(uri, kind="checkpoint") as out:  # resumed for more steps
        os.remove(os.path.join(out, "manifest.json"))
        with open(os.path.join(out, "history.jsonl"), "w") as f:
            f.write('{"step": 301}\n')
        read = storage.local_input(uri)  # the published run, for evaluate
        assert read != out and sorted(os.listdir(read)) == sorted(objects_under(s3_env, "run7"))
        with open(os.path.join(out, "history.jsonl")) as f:
            assert f.read() == '{"step": 301}\n'
        make_output(out, kind="checkpoint", shards=2, seed=2)
    assert "run7/history.jsonl" in objects(s3_env)


def test_the_store_outvotes_a_cache(s3_env, caplog):
    """A wiped output starts fresh (it was resumed from the cache, or the cache's copy was
    uploaded again), and a plain bucket of images read again has lost what was deleted."""
    uri = s3_env.uri("run1")
    with storage.local_output(uri, kind="checkpoint") as out:
        make_output(out, kind="checkpoint", shards=2, seed=1)
    client = s3_env.client()
    for name in objects_under(s3_env, "run1", control=True):
        client.remove_object(s3_env.bucket, "run1/" + name)
    with caplog.at_level(logging.INFO, logger="hrnet.storage"):
        with storage.local_output(uri, kind="checkpoint") as out:
            assert [n for n in os.listdir(out) if n not in storage.CONTROL_FILES] == []
            make_output(out, kind="checkpoint", shards=1, seed=3)
    assert any("holds nothing" in r.getMessage() and "starting" in r.getMessage() for r in caplog.records)
    assert sorted(objects_under(s3_env, "run1")) == ["labels.txt", "manifest.json", "train-00000-of-00001"]

    images = s3_env.uri("images")
    for name in ("a.jpg", "b.jpg"):
        storage.write_bytes(images + "/" + name, b"jpeg bytes " + name.encode())
    assert sorted(os.listdir(storage.fetch(images))) == ["a.jpg", "b.jpg"]
    client.remove_object(s3_env.bucket, "images/b.jpg")
    assert sorted(os.listdir(storage.fetch(images))) == ["a.jpg"]


# ------------------------------------------------------------------ one output, one kind

def test_no_step_replaces_another_kinds_manifest(s3_env, capsys, tmp_path):
    for where in (str(tmp_path / "records"), s3_env.uri("records")):
        with storage.local_output(where, kind="tfrecords") as out:
            make_output(out)
        code, err = hrnet(capsys, "demo-data", "--out", where)
        assert code == 2 and "already holds a tfrecords output" in error_line(err), err
        assert read_manifest(storage.local_input(where), kind="tfrecords")
    # The manifest writer itself refuses too (the last line of defence).
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_manifest(str(ckpt), {"kind": "checkpoint"})
    with pytest.raises(Exception, match="refusing to replace"):
        write_manifest(str(ckpt), {"kind": "evaluation"})


# ------------------------------------------------------------------ leases

def test_a_second_writer_is_refused_until_the_first_is_done(s3_env, tmp_path, monkeypatch):
    for where in (s3_env.uri("run"), str(tmp_path / "run")):
        with storage.local_output(where, kind="checkpoint"):
            with pytest.raises(storage.LeaseHeldError, match=r"is being written by .* pid %d" % os.getpid()):
                with storage.local_output(where, kind="checkpoint"):
                    pass
        with storage.local_output(where, kind="checkpoint"):  # released: the next writer gets it
            pass


def test_sigterm_releases_the_lease_and_says_so(s3_env, tmp_path):
    """Kubernetes stops a pod with SIGTERM: the step exited -15 without a word and left its
    lease to expire (a retry was refused for two minutes). Now it releases it and says so in
    one line, and the next run takes the output at once."""
    import signal

    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "src" / "train" / str(c))
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "src" / "train" / str(c) / f"{i}.png")
    # An "image" that is a named pipe nobody writes: the convert blocks opening it, so the
    # signal always lands mid-conversion (a conversion of some seconds ended before a SIGTERM
    # sent under load, whose handler the exiting interpreter then never ran).
    blocker = tmp_path / "src" / "train" / "1" / "zz-blocks.png"
    os.mkfifo(blocker)
    out = s3_env.uri("records")
    command = [sys.executable, "-m", "hrnet", "convert", "--src", str(tmp_path / "src"), "--out", out,
               "--workers", "1", "--no-progress"]
    # Its state folder in the writer's cache: the conversion has begun, under its lease.
    from hrnet.data.convert import STATE_DIR

    state = os.path.join(storage.cache_path(out), STATE_DIR)
    code = kill_when(command, lambda: os.path.isdir(state), tmp_path / "convert.log", signum=signal.SIGTERM)
    os.remove(blocker)  # a real image in its place: the same input, which the next run finishes
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(blocker)
    log_text = (tmp_path / "convert.log").read_text()
    assert code == 128 + signal.SIGTERM, log_text[-3000:]
    assert "hrnet convert: stopped by SIGTERM; its lease released" in log_text and "Traceback" not in log_text
    assert not storage.exists(out + "/" + storage.LEASE_FILE)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_stop_between_the_lease_put_and_its_read_back_leaves_no_lease(s3_env, monkeypatch):
    """The SIGTERM test above failed in CI once: the signal landed inside Lease.__enter__,
    after its PUT, and ``with`` runs no __exit__ for an __enter__ that raised."""
    uri = s3_env.uri("run")
    read = storage.Lease._read_remote
    calls = []

    def stopped_on_the_read_back(self):
        calls.append(1)
        if len(calls) == 2:  # the first read looks for a holder, the second checks the PUT
            raise cli.Stopped(15)
        return read(self)

    monkeypatch.setattr(storage.Lease, "_read_remote", stopped_on_the_read_back)
    with pytest.raises(cli.Stopped):
        with storage.Lease(uri):
            pass
    assert len(calls) >= 2 and not storage.exists(uri + "/" + storage.LEASE_FILE)


RACES = 25


def test_two_writers_starting_at_the_same_moment_one_wins_every_race(s3_env, tmp_path):
    """Two processes try for the same output's lease at the same moment, RACES times. On the
    MinIO gateway (conditional writes ignored) both won 8 races of 40 when the lease relied
    on If-None-Match; exactly one must win each race, on every store."""
    env = {k: v for k, v in os.environ.items() if k != "HRNET_RUN_ID"}  # one run's retries take over
    start, interval = time.time() + 3, 0.4
    os.makedirs(tmp_path / "done")
    sides = [subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "lease_race.py"),
                               s3_env.uri("out"), str(RACES), str(start), str(interval), str(tmp_path / "done")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [side.communicate(timeout=120) for side in sides]
    assert all(side.returncode == 0 for side in sides), [err[-2000:] for _, err in results]
    won = [set(json.loads(out)) for out, _ in results]
    assert won[0] & won[1] == set(), "both sides won races %s" % sorted(won[0] & won[1])
    assert won[0] | won[1] == set(range(RACES)), "nobody won races %s" % sorted(set(range(RACES)) - won[0] - won[1])
    assert not [n for n in objects(s3_env) if not n.endswith(storage.CONTROL_FILES)], "left behind"


def test_the_probe_finds_which_stores_honour_conditional_writes(s3_env, request):
    from hrnet.storage import lease

    uri = s3_env.uri("run")
    with storage.Lease(uri):
        pass
    honoured = lease._conditional_writes[storage.settings_from_env().url]
    assert honoured == (request.node.callspec.params["every_server"] != "gateway")
    assert objects(s3_env) == {}, "the probe or a claim left behind"


def test_a_dead_writers_claim_is_cleared_and_a_live_ones_refuses(s3_env, monkeypatch):
    """The claims that stand in for conditional writes, on every store (the probe's answer
    set to "ignored"): a claim whose writer is gone never blocks; a live one does, named."""
    from hrnet.storage import lease

    monkeypatch.setitem(lease._conditional_writes, storage.settings_from_env().url, False)
    monkeypatch.setattr(lease, "CLAIM_ATTEMPTS", 2)
    uri = s3_env.uri("run")
    claim = f"{uri}/{storage.LEASE_CLAIMS}/theirs.json"
    dead = {"host": "node-7", "pid": 4242, "run_id": "", "token": "theirs", "expires": time.time() - 1}
    storage.write_text(claim, json.dumps(dead))
    with storage.Lease(uri):
        assert not storage.exists(claim)
    storage.write_text(claim, json.dumps(dict(dead, expires=time.time() + 600)))
    with pytest.raises(storage.LeaseHeldError, match="node-7 pid 4242"):
        storage.Lease(uri).__enter__()
    assert list(objects(s3_env)) == [f"run/{storage.LEASE_CLAIMS}/theirs.json"]


def test_a_crashed_writers_lease_expires_and_force_takes_it(s3_env, monkeypatch):
    uri = s3_env.uri("run")
    body = {"host": "node-7", "pid": 4242, "run_id": "", "token": "theirs", "expires": time.time() + 600}
    storage.write_text(uri + "/" + storage.LEASE_FILE, json.dumps(body))
    with pytest.raises(storage.LeaseHeldError, match="node-7 pid 4242"):
        storage.Lease(uri).__enter__()
    with storage.Lease(uri, force=True):
        pass
    storage.write_text(uri + "/" + storage.LEASE_FILE, json.dumps(dict(body, expires=time.time() - 1)))
    with storage.Lease(uri):  # expired: taken without --force
        pass
    # A retried pod of the same pipeline run takes over at once.
    storage.write_text(uri + "/" + storage.LEASE_FILE, json.dumps(dict(body, run_id="run-1")))
    monkeypatch.setenv("HRNET_RUN_ID", "run-1")
    with storage.Lease(uri):
        pass


def test_a_writer_that_lost_its_lease_stops_before_it_writes(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HRNET_LEASE_TTL", "1.5")  # renewed every 0.5 s
    uri = s3_env.uri("run")
    src = make_output(str(tmp_path / "src"), kind="checkpoint")
    with pytest.raises(storage.LeaseLostError, match="taken over"):
        with storage.local_output(uri, kind="checkpoint") as out:
            make_output(out, kind="checkpoint")
            with storage.Lease(uri, force=True):  # another writer forces its way in
                time.sleep(1.5)
                storage.mirror(src, uri)
    assert "run/manifest.json" not in objects(s3_env)


def test_two_trainings_on_one_output_one_completes_one_is_refused(s3_env, tmp_path):
    """Real `hrnet train` processes on one s3:// output: the second is refused with who holds
    it, the first completes with every checkpoint it keeps."""
    write_images(str(tmp_path / "images"))
    data = s3_env.uri("data")
    env = dict(os.environ)
    assert cli.main(["convert", "--src", str(tmp_path / "images"), "--out", data, "--no-progress"]) == 0
    out = s3_env.uri("runs/a")
    command = [sys.executable, "-m", "hrnet", "train", "--data", data, "--out", out, "--model", TINY_CONFIG,
               "--image-size", "32", "--batch-size", "4", "--train-steps", "30", "--checkpoint-every", "5",
               "--log-every", "5", "--seed", "1"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lease = f"runs/a/{storage.LEASE_FILE}"
    deadline = time.monotonic() + 120
    while lease not in objects(s3_env):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.2)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert "is being written by" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=600) == 0, first.stdout.read()
    manifest = json.loads(storage.read_text(out + "/manifest.json"))
    assert manifest["step"] == 30
    assert lease not in objects(s3_env)

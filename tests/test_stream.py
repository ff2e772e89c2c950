"""Training and evaluation data streamed from object storage (hrnet.data.stream), against
SeaweedFS: bounded local disk, the first step before the last shard is fetched, the very
records a staged copy gives, exact resume after SIGKILL, and a bad shard named in one line.

The data: the small noise tree converted into many shards (SHARDS train, 4 validation), so
that a bound of a few shards is far below the split.
"""
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import TINY_CONFIG, kill_when, write_images

from hrnet import storage

SHARDS = 24


def make_records(s3_env, tmp_path, shards=SHARDS, per_class=12):
    """(URI of the records in the bucket, a local copy of them)."""
    from hrnet.data.convert import convert_dataset

    write_images(str(tmp_path / "images"), train=per_class)
    local = str(tmp_path / "records")
    convert_dataset(str(tmp_path / "images"), local, train_shards=shards, validation_shards=4, workers=1,
                    progress=False)
    uri = s3_env.uri("data")
    storage.upload(local, uri)
    return uri, local


@pytest.fixture
def records(s3_env, tmp_path):
    return make_records(s3_env, tmp_path)


def _largest(local, split="train"):
    return max(s["bytes"] for s in json.load(open(os.path.join(local, "manifest.json")))["shards"][split])


def _info(uri):
    from hrnet import data
    from hrnet.data.reference import stage_or_stream

    folder, remote = stage_or_stream(uri, ("train", "validation"), verify=True, stream=True)
    assert remote == uri and not [n for n in os.listdir(folder) if n.startswith(("train-", "validation-"))]
    return data.dataset_info(folder, remote=remote)


def _disk(folder):
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, n)))


def test_a_streamed_split_gives_the_staged_records_within_its_bound(records):
    from hrnet import data
    from hrnet.data import stream

    uri, local = records
    budget = 5 * _largest(local)  # 4 shards open (cycle_length) and one ahead; the split is 24
    # A shuffle buffer smaller than the epoch (ImageNet's 10,000 records are ~10 of its 1,024
    # shards), or the first batch waits for all of it.
    common = dict(batch_size=4, image_size=32, seed=7, cycle_length=4, shuffle_buffer=8)
    staged = data.train_dataset(data.dataset_info(local), **common)
    streamed = data.train_dataset(_info(uri), data_cache=budget, **common)
    s = stream._open[-1]
    assert not s.keep

    seen, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                seen.append(_disk(s.local_dir))
            except OSError:  # a file deleted while it was listed
                pass
            stop.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    batches = 3 * 72 // 4  # three epochs
    try:
        for i, ((a, la), (b, lb)) in enumerate(zip(staged.take(batches), streamed.take(batches))):
            if i == 0:
                assert s.fetched < SHARDS, "the first batch waited for the whole split"
            np.testing.assert_array_equal(la.numpy(), lb.numpy())
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    finally:
        stop.set()
        sampler.join()
    assert i == batches - 1
    assert s.fetched >= 2 * SHARDS  # fetched again each epoch: the split never fitted
    assert s.peak <= budget and max(seen) <= budget and len(seen) > 10


def test_a_share_that_fits_is_fetched_once_and_evaluation_streams_too(records):
    from hrnet import data
    from hrnet.data import stream

    uri, local = records
    info = _info(uri)
    streamed = data.train_dataset(info, batch_size=4, image_size=32, seed=1, data_cache=10 ** 9)
    s = stream._open[-1]
    assert s.keep
    for _ in streamed.take(3 * 72 // 4):
        pass
    assert s.fetched == SHARDS

    staged = list(data.eval_dataset(data.dataset_info(local), 5, 32, with_filenames=True))
    got = list(data.eval_dataset(info, 5, 32, with_filenames=True, data_cache=10 ** 9))
    assert [f.numpy().tolist() for *_, f in got] == [f.numpy().tolist() for *_, f in staged]
    assert stream._open[-1] is s  # the one pass closed its stream (and removed its folder)


def test_an_outage_mid_stream_stalls_the_input_and_it_goes_on_with_the_same_records(records, s3_env,
                                                                                     monkeypatch):
    """The store goes away for a second while the shards stream: the fetches retry, the
    pipeline waits (and counts the wait), and every batch is the one a staged copy gives."""
    from s3server import TcpProxy

    from hrnet import data
    from hrnet.data import stream

    uri, local = records
    info = _info(uri)
    proxy = TcpProxy(*s3_env.server.host_port).start()
    monkeypatch.setenv("S3_ENDPOINT", proxy.endpoint)
    monkeypatch.setenv("HRNET_S3_RETRIES", "7")
    monkeypatch.setenv("HRNET_S3_BACKOFF", "0.1")
    common = dict(batch_size=4, image_size=32, seed=5, cycle_length=4, shuffle_buffer=8)
    # Down once a third of the split has come through, for longer than the input's lead.
    proxy.cut_after(sum(s["bytes"] for s in json.load(open(os.path.join(local, "manifest.json")))["shards"]["train"])
                    // 3, down=True, restore_after=1.0)
    try:
        staged = data.train_dataset(data.dataset_info(local), **common)
        streamed = data.train_dataset(info, data_cache=5 * _largest(local), **common)
        s = stream._open[-1]
        for (a, la), (b, lb) in zip(staged.take(72 // 4), streamed.take(72 // 4)):
            np.testing.assert_array_equal(la.numpy(), lb.numpy())
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    finally:
        proxy.stop()
    assert proxy.cuts >= 1 and s.error is None
    assert s.waited > 0.5, s.waited  # the outage shows as time waiting for data


def test_a_stream_too_small_for_the_shards_read_at_once_is_refused(records):
    from hrnet import data
    from hrnet.errors import HrnetError

    uri, _ = records
    with pytest.raises(HrnetError, match=r"too small to stream .* reads 4 shards at a time.*give it at least"):
        data.train_dataset(_info(uri), batch_size=4, image_size=32, seed=1, cycle_length=4, data_cache=1000)


def _train(data, out, *extra):
    return [sys.executable, "-m", "hrnet", "train", "--data", data, "--out", out, "--model", TINY_CONFIG,
            "--image-size", "32", "--batch-size", "4", "--train-steps", "30", "--checkpoint-every", "5",
            "--log-every", "1", "--seed", "3", "--eval-every", "0", *extra]


def _losses(out):
    return [h["loss"] for h in map(json.loads, storage.read_text(out + "/history.jsonl").splitlines())
            if "loss" in h]


@pytest.mark.slow
def test_a_streamed_run_killed_and_resumed_logs_the_loss_of_a_staged_one(records, s3_env, tmp_path):
    """The whole command: a bound of a few shards, SIGKILL after a checkpoint reached the
    bucket, the same command again; every step's loss equals a run on staged records."""
    uri, local = records
    sizes = [s["bytes"] for s in json.load(open(os.path.join(local, "manifest.json")))["shards"]["train"]]
    budget = 17.5 * max(sizes)  # the 16 shards read at a time and one more
    assert budget < sum(sizes)
    small = ["--data-cache-gb", str(budget / 1e9)]
    streamed, staged = s3_env.uri("runs/streamed"), s3_env.uri("runs/staged")
    env = dict(os.environ)
    code = kill_when(_train(uri, streamed, *small), lambda: storage.exists(streamed + "/ckpt-10.index"),
                     tmp_path / "killed.log", env=env)
    assert code == -signal.SIGKILL
    log_text = (tmp_path / "killed.log").read_text()
    assert "streaming 24 train shards" in log_text and "all of them fit" not in log_text, log_text[-3000:]
    done = subprocess.run(_train(uri, streamed, *small), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resuming from ckpt-" in done.stderr, done.stderr[-3000:]
    whole = subprocess.run(_train(uri, staged, "--data-cache-gb", "0"), env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0 and "streaming" not in whole.stderr, whole.stderr[-3000:]
    assert _losses(streamed) == pytest.approx(_losses(staged), rel=1e-5, abs=1e-6)
    history = [json.loads(h) for h in storage.read_text(streamed + "/history.jsonl").splitlines()]
    assert all(h["data_wait_s"] >= 0 for h in history if "loss" in h)  # the input's wait, per progress line
    assert len(_losses(staged)) == 30


def test_a_corrupt_shard_is_named_in_one_line(records, s3_env, tmp_path):
    uri, local = records
    name = "train-00005-of-00024"
    with open(os.path.join(local, name), "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    client = s3_env.client()
    import io

    client.put_object(s3_env.bucket, "data/" + name, io.BytesIO(bytes(data)), len(data))
    done = subprocess.run(_train(uri, str(tmp_path / "run")), env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("hrnet train: error")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert name in lines[0] and "sha256" in lines[0], lines[0]


@pytest.mark.slow
def test_two_workers_each_stream_only_their_own_shards(s3_env, tmp_path):
    """`hrnet launch --nproc 2`: each rank streams its half of the shards (48 here, 24 each,
    more than the 16 it reads at once and one more, within a bound below its share), and
    the run logs the loss of the same two workers on staged records at every step."""
    uri, local = make_records(s3_env, tmp_path, shards=48, per_class=16)
    budget_per_rank = 20 * _largest(local)
    streamed, staged = s3_env.uri("runs/streamed"), s3_env.uri("runs/staged")
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    runs = {}
    for out, gb in ((streamed, 2 * budget_per_rank / 1e9), (staged, 0)):
        launch = [sys.executable, "-m", "hrnet", "launch", "--nproc", "2", "--",
                  *_train(uri, out, "--data-cache-gb", str(gb))]
        launch[launch.index("--train-steps") + 1] = "10"
        runs[out] = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
        assert runs[out].returncode == 0, (runs[out].stdout + runs[out].stderr)[-3000:]
    log_text = runs[streamed].stdout + runs[streamed].stderr
    assert log_text.count("streaming 24 train shards") == 2 and "all of them fit" not in log_text, log_text[-3000:]
    assert "streaming" not in runs[staged].stdout + runs[staged].stderr
    assert _losses(streamed) == pytest.approx(_losses(staged), rel=1e-5, abs=1e-6)
    assert len(_losses(staged)) == 10

"""Acceptance: the steps read and write s3:// URIs, and a training run killed mid-way
resumes from the bucket on a machine that has none of its local files.

    convert --out s3://...                          shards in the bucket, manifest last
    hrnet train --data s3://... --out s3://...      killed (SIGKILL) after a checkpoint was
                                                    mirrored; the local cache is deleted; the
                                                    same command resumes from the bucket
    evaluate / export with URIs                     read the checkpoint from the bucket, write
                                                    their outputs to it

Training runs as real `hrnet train` processes (one of them killed) against SeaweedFS (or
MinIO with HRNET_TEST_S3_ENDPOINT), with a tiny model on 32x32 images. Not against moto as
well any more: what this test asks of a store, the storage suites ask of all three, and the
minute it took in CI went to streaming's tests.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import TINY_CONFIG, kill_when, write_images

from hrnet import storage

STEPS = 60  # the first run is killed once its third checkpoint (step 15) is in the bucket


def mirrored_past(run, step):
    """The bucket's TF checkpoint pointer names ckpt-N with N >= step, and ckpt-5 is gone."""
    try:
        pointer = storage.read_text(run + "/checkpoint")
    except storage.ObjectNotFoundError:
        return False
    latest = int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', pointer).group(1))
    names = storage.list_files(run)
    return latest >= step and f"ckpt-{latest}.index" in names and "ckpt-5.index" not in names


@pytest.mark.slow
def test_train_killed_resumes_from_the_bucket(s3_env, tmp_path):
    from hrnet.data.convert import convert_dataset
    from hrnet.evaluate import evaluate
    from hrnet.export import export_model

    write_images(str(tmp_path / "images"))
    data, run = s3_env.uri("data"), s3_env.uri("runs/tiny")
    convert_dataset(str(tmp_path / "images"), data, train_shards=2, validation_shards=1, workers=1, progress=False)
    assert storage.list_files(data) == ["labels.txt", "manifest.json", "train-00000-of-00002",
                                        "train-00001-of-00002", "validation-00000-of-00001"]

    train = [sys.executable, "-m", "hrnet", "train", "--data", data, "--out", run, "--model", TINY_CONFIG,
             "--image-size", "32", "--batch-size", "8", "--train-steps", str(STEPS),
             "--checkpoint-every", "5", "--keep-checkpoints", "2", "--log-every", "5", "--seed", "3"]
    # Killed once the bucket holds a later checkpoint, and no longer the first one: the mirror
    # keeps what the checkpoint manager keeps (2), not every one saved.
    kill_when(train, lambda: mirrored_past(run, 15), tmp_path / "first-run.log", env=dict(os.environ))
    assert not storage.exists(run + "/manifest.json")
    with pytest.raises(storage.IncompleteError, match="incomplete"):
        storage.local_input(run)  # an unfinished run is not a checkpoint set that evaluate would take

    # Another node: nothing of the first run's local files is left.
    shutil.rmtree(s3_env.env["HRNET_CACHE_DIR"])
    result = subprocess.run(train, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    resumed = re.search(r"resuming from ckpt-(\d+) \(step (\d+)\)", output)
    assert resumed, output[-3000:]
    assert 15 <= int(resumed.group(2)) < STEPS

    manifest = json.loads(storage.read_text(run + "/manifest.json"))
    assert manifest["kind"] == "checkpoint" and manifest["step"] == STEPS
    steps = [h["step"] for h in map(json.loads, storage.read_text(run + "/history.jsonl").splitlines()) if "loss" in h]
    assert steps == list(range(5, STEPS + 1, 5))  # one line per log step, none lost or repeated
    names = storage.list_files(run)
    assert f"ckpt-{STEPS}.index" in names and "ckpt-5.index" not in names  # only the kept checkpoints
    checkpoint_dir = storage.local_input(run)  # verified against the manifest
    with open(os.path.join(checkpoint_dir, "manifest.json")) as f:
        assert json.load(f)["step"] == STEPS

    # The next steps read the checkpoint and the data from the bucket and write their outputs to it.
    evaluation = s3_env.uri("eval/tiny")
    evaluate(data, run, out=evaluation, batch_size=4)
    metrics = json.loads(storage.read_text(evaluation + "/metrics.json"))
    # The best weights by validation top-1 (validated every epoch, as by default).
    assert metrics["count"] == 6 and (metrics["weights"], metrics["step"]) == ("best", manifest["best"]["step"])
    assert json.loads(storage.read_text(evaluation + "/manifest.json"))["kind"] == "evaluation"
    exported = s3_env.uri("export/tiny")
    export_model(run, exported, onnx=False)
    shutil.rmtree(s3_env.env["HRNET_CACHE_DIR"])  # read it back as another machine would
    local = storage.local_input(exported)  # every file verified against the export's manifest
    with open(os.path.join(local, "manifest.json")) as f:
        assert json.load(f)["kind"] == "export"
    assert os.path.exists(os.path.join(local, "1", "saved_model.pb"))

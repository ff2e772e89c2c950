"""Bad run parameters stop the pipeline in its first step, with a message naming them.

These run the real pipeline with KFP's local runner; the run stops in the validate step,
so nothing heavy starts.
"""
import glob
import json
import os

import pytest
from kfp import local

from components.validate import validate
from pipelines.hrnet_pipeline import build_pipeline

GOOD = dict(data_uri="/data/raw", model="w18_small_v1", devices=1, nodes=1,
            device="cpu",
            batch_size=32, epochs=1.0, train_steps=0, lr=0.0, precision="", image_size=32, seed=0,
            train_config=dict(schedule="cosine", flip=False, area_range=[0.35, 1]), init_from="", deploy_name="hrnet",
            serving_runtime="tensorflow", train_devices=8)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def test_devices_3_fails_the_first_step_and_the_run_is_recorded(runs_dir, capfd):
    pipeline = build_pipeline("cpu", data_pvc=None)
    with pytest.raises(RuntimeError, match="validate"):
        pipeline(data_uri="/data/raw", devices=3)
    out = capfd.readouterr()
    assert "devices must be 1, 2, 4 or 8" in out.out + out.err
    (run_dir,) = glob.glob(str(runs_dir / "hrnet-classification-*"))
    # Nothing after the check started; the exit handler wrote down the failure.
    assert os.listdir(run_dir) == ["record-run"]
    with open(os.path.join(run_dir, "record-run", "run_record", "manifest.json")) as f:
        record = json.load(f)
    assert record["kind"] == "run-status" and record["state"] == "FAILED"


@pytest.mark.parametrize("change, message", [
    (dict(model="w99"), "unknown HRNet model 'w99'"),
    (dict(deploy_name="HRNet"), "the InferenceService name 'HRNet' must be a DNS label"),
    (dict(deploy_name="a" * 46), "at most 45 characters"),
    (dict(serving_runtime="triton"), "unknown serving runtime 'triton'; choose one of tensorflow, hrnet"),
    (dict(data_uri=""), "data_uri is required: an image tree to convert or TFRecords"),
    (dict(data_uri="gs://bkt/x"), "data_uri 'gs://bkt/x' is neither an s3:// / minio:// URI nor a path"),
    (dict(precision="fp8"), "precision must be one of fp32, mixed_fp16, bf16"),
    (dict(image_size=100), "image_size must be a positive multiple of 32"),
    (dict(device="npu", precision="bf16"), "Ascend 910 has no bf16"),
    (dict(train_config={"shedule": "cosine"}), "unknown train config key(s) in train_config: shedule"),
    (dict(train_config={"schedule": "linear"}), "schedule must be one of piecewise, cosine, got 'linear'"),
    (dict(train_config={"warmup_epochs": -1}), "weight_decay and warmup_epochs must be >= 0"),
    (dict(train_config={"log_every": 2.5}), "train_config: log_every must be a whole number, got 2.5"),
    (dict(train_config={"flip": "no"}), "train_config: flip must be true or false, got 'no'"),
    (dict(train_config={"batch_size": 8}), "train_config may not set batch_size: the pipeline sets it"),
    (dict(train_config={"area_range": [0.5, 2]}), "area_range must satisfy 0 < min <= max <= 1"),
    (dict(train_config={"eval_every": -1}), "eval_every must be >= 0"),
    (dict(train_config={"init_from": "s3://b/w"}), "train_config may not set init_from: the pipeline sets it"),
    (dict(train_config={"device": "gpu"}), "train_config may not set device: the pipeline sets it"),
    (dict(init_from="/no/such/weights.pth"), "init_from '/no/such/weights.pth' is neither"),
    (dict(nodes=0), "nodes must be 1 or more"),
    (dict(devices=8, train_devices=1), "devices=8, but this pipeline's train pod was compiled with CPU and memory "
                                       "for 1"),
])
def test_bad_parameters_are_named(runs_dir, capfd, change, message):
    with pytest.raises(RuntimeError, match="validate"):
        validate(**dict(GOOD, **change))
    out = capfd.readouterr()
    assert message in out.out + out.err


def test_good_parameters_give_the_typed_config(runs_dir):
    # Only what the run sets, typed: 0 and "" (the library's defaults) are left out, and the
    # whole numbers a KFP struct carries as doubles are ints again.
    assert validate(**GOOD).outputs["config"] == dict(model="w18_small_v1", device="cpu", batch_size=32, epochs=1.0,
                                                       image_size=32, schedule="cosine", flip=False,
                                                       area_range=[0.35, 1.0])

"""Training on CPU: it learns, a SIGKILLed run resumes where it stopped, a diverging run
stops with a clear error, fine-tuning re-initialises only the classifier, and the device
backends (the Ascend one through a fake ``npu_device`` that records its calls).

Real training throughout: the demo digits converted to TFRecords, 32x32 images, small
HRNet configs (same code as the official ones, fewer channels) so that it stays fast.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import SMALL_CONFIG, TINY_CONFIG, kill_when


def read_history(out, validation=False):
    """history.jsonl's training lines (or, with ``validation``, its validation lines)."""
    with open(os.path.join(out, "history.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [h for h in lines if ("val_top1" in h) == validation]


def test_learns_the_digits(digits, tmp_path):
    import tensorflow as tf

    from hrnet.evaluate import evaluate
    from hrnet.train.loop import train

    out = str(tmp_path / "run")
    manifest = train({
        "data": str(digits.records), "out": out, "model": SMALL_CONFIG, "image_size": 32,
        "batch_size": 32, "train_steps": 150, "lr": 0.1, "schedule": "cosine", "warmup_epochs": 0.3,
        # Digits must not be mirrored; a 32 px digit survives crops down to a third of its area.
        "flip": False, "area_range": [0.35, 1.0], "log_every": 15, "checkpoint_every": 100, "seed": 0,
    })
    history = read_history(out)
    assert [h["step"] for h in history] == list(range(15, 151, 15))
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"] / 2, history
    assert last["top1"] > 0.6, history  # training batches (augmented); chance is 0.1
    assert history[0]["lr"] > history[-1]["lr"] and all(h["images_per_sec"] > 0 for h in history)

    assert manifest["kind"] == "checkpoint" and manifest["step"] == 150 and manifest["optimizer_iterations"] == 150
    assert manifest["model"] == "small" and manifest["num_classes"] == 10 and manifest["image_size"] == 32
    names = set(os.listdir(out))
    assert {"train_config.yaml", "labels.txt", "history.jsonl", "manifest.json", "weights.index", "checkpoint",
            "ckpt-100.index", "ckpt-150.index", "logs"} <= names
    with open(os.path.join(out, "labels.txt")) as a, open(digits.records / "labels.txt") as b:
        assert a.read() == b.read()
    # TensorBoard scalars, readable by TF's own event reader.
    events = [os.path.join(out, "logs", f) for f in os.listdir(os.path.join(out, "logs"))]
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0]) for v in e.summary.value}
    assert {"train/loss", "train/top1", "train/lr", "train/images_per_sec"} <= tags

    # It generalizes: validation accuracy far above chance.
    metrics = evaluate(str(digits.records), out)
    assert metrics["count"] == 359 and metrics["top1"] > 0.8, metrics


def _train_command(digits, out, steps):
    # 10 steps per epoch (80 images per epoch, batch 8): the lr drops x0.1 at steps 10 and 30.
    return [sys.executable, "-m", "hrnet", "train", "--data", str(digits.records), "--out", str(out),
            "--model", TINY_CONFIG, "--image-size", "32", "--batch-size", "8",
            "--nb-train-samples", "80", "--train-steps", str(steps), "--lr", "0.05", "--lr-decay-epochs", "1", "3",
            "--checkpoint-every", "5", "--keep-checkpoints", "2", "--log-every", "1", "--seed", "1"]


def test_a_run_killed_twice_resumes_each_time_with_the_loss_of_every_step_of_an_uninterrupted_one(digits, tmp_path):
    """Exact resume: the input position is derived from the step, so a run SIGKILLed at two
    points and resumed each time by the same command logs the same loss at every step as one
    never killed; the step, the optimizer's own step counter and the lr come back from the
    checkpoint, and a finished run started again does nothing."""
    from hrnet.train.config import load_saved

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_DETERMINISTIC_OPS="1")
    whole = tmp_path / "whole"
    done = subprocess.run(_train_command(digits, whole, 45), env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    command = _train_command(digits, out, 45)
    for i, step in enumerate((10, 20)):
        kill_when(command, (out / f"ckpt-{step}.index").exists, tmp_path / f"killed-{i}.log", env=env, timeout=240)
        assert not (out / "manifest.json").exists()  # killed: the folder is incomplete
        assert max(h["step"] for h in read_history(out)) < 45
    last = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    output = last.stdout + last.stderr
    assert last.returncode == 0 and "resuming from ckpt-" in output, output[-3000:]
    resumed_at = int(output.split("resuming from ckpt-")[1].split(" ")[0])
    assert 15 <= resumed_at < 45 and resumed_at % 5 == 0  # ckpt-15 where the kill beat the pointer's update

    manifest = json.loads((out / "manifest.json").read_text())
    # The step and the optimizer's own step counter both came back from the checkpoint.
    assert manifest["step"] == 45 and manifest["optimizer_iterations"] == 45
    expected, got = read_history(whole), read_history(out)
    assert [h["step"] for h in got] == list(range(1, 46))  # the killed runs' tails were not kept twice
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in expected], rel=1e-5, abs=1e-6)
    assert [h["top1"] for h in got] == [h["top1"] for h in expected]
    schedule = load_saved(str(out)).lr_schedule()
    assert [h["lr"] for h in got] == pytest.approx([schedule(s - 1) for s in range(1, 46)])
    assert got[-1]["lr"] == pytest.approx(0.05 * 0.01)
    # TensorBoard: each step once, though three processes wrote the curve.
    assert _event_steps(out / "logs", "train/loss") == list(range(1, 46))
    # Only the last two checkpoints are kept.
    assert sorted(f for f in os.listdir(out) if f.endswith(".index") and f.startswith("ckpt")) == \
        ["ckpt-40.index", "ckpt-45.index"]
    # A finished run started again does nothing.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "complete" in again.stdout + again.stderr


def _event_steps(logs, tag):
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    steps = []
    for path in sorted(logs.glob("*tfevents*")):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(raw.numpy())
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(digits, tmp_path, capsys):
    import tensorflow as tf

    from hrnet import cli

    out = tmp_path / "run"
    code = cli.main(["train", "--data", str(digits.records), "--out", str(out), "--model",
                     TINY_CONFIG, "--image-size", "32", "--batch-size", "8", "--train-steps", "20",
                     "--lr", "1e30", "--checkpoint-every", "1", "--log-every", "1", "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 2
    message = [line for line in err.splitlines() if line.startswith("hrnet train: error:")]
    assert message and "the loss became" in message[0] and "last good checkpoint ckpt-" in message[0], err
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists()
    latest = tf.train.latest_checkpoint(str(out))
    assert latest is not None
    reader = tf.train.load_checkpoint(latest)
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_floating:
            assert np.all(np.isfinite(reader.get_tensor(name))), name


def test_several_steps_per_loop_train_exactly_as_one_and_stop_at_every_event(digits, tmp_path):
    """steps_per_loop runs steps in one call of the compiled loop; log lines, checkpoints and
    validations still come on their steps, with the same figures as a step per call."""
    from hrnet.train.loop import train

    def run(name, steps_per_loop):
        # 6 steps per epoch (48 images, batch 8): validations at 6, 12 and 14 (the end).
        out = tmp_path / name
        manifest = train({"data": str(digits.records), "out": str(out), "model": TINY_CONFIG, "image_size": 32,
                          "batch_size": 8, "nb_train_samples": 48, "train_steps": 14, "eval_every": 1,
                          "lr": 0.05, "log_every": 4, "checkpoint_every": 5, "keep_checkpoints": 10,
                          "steps_per_loop": steps_per_loop, "seed": 3})
        checkpoints = sorted(int(f[5:-6]) for f in os.listdir(out) if f.startswith("ckpt-") and f.endswith(".index"))
        return manifest, read_history(out), read_history(out, validation=True), checkpoints

    one, looped = run("one", 1), run("looped", 3)
    assert looped[0]["step"] == looped[0]["optimizer_iterations"] == 14
    assert [h["step"] for h in looped[1]] == [h["step"] for h in one[1]] == [4, 8, 12, 14]
    assert [h["step"] for h in looped[2]] == [h["step"] for h in one[2]] == [6, 12, 14]
    assert looped[3] == one[3] == [5, 6, 10, 12, 14]
    assert [h["loss"] for h in looped[1]] == pytest.approx([h["loss"] for h in one[1]], rel=1e-4)
    assert [h["top1"] for h in looped[1]] == [h["top1"] for h in one[1]]
    assert [h["val_top1"] for h in looped[2]] == pytest.approx([h["val_top1"] for h in one[2]], abs=1 / 359)


def test_a_loop_of_several_steps_stops_at_the_step_that_diverged(digits, tmp_path):
    from hrnet.train.loop import train
    from hrnet.train.run import NonFiniteLossError

    def diverged_at(steps_per_loop):
        with pytest.raises(NonFiniteLossError) as e:
            train({"data": str(digits.records), "out": str(tmp_path / str(steps_per_loop)), "model": TINY_CONFIG,
                   "image_size": 32, "batch_size": 8, "train_steps": 40, "lr": 1e30, "log_every": 100,
                   "checkpoint_every": 100, "eval_every": 0, "steps_per_loop": steps_per_loop, "seed": 1})
        return int(re.search(r" at step (\d+) ", str(e.value)).group(1))

    step = diverged_at(1)
    assert 1 <= step < 40 and diverged_at(16) == step


# Under Keras 2 this path (validation, the best weights kept, evaluate and export of them) runs in
# the Ascend image's TF 2.6.5 itself: test_containers.py's Python-layer test.
def test_validation_every_epoch_keeps_the_best_weights_which_evaluate_and_export_reproduce(digits, tmp_path):
    """Three epochs on the digits, then two more on records whose training labels are
    shifted by one (digit d labelled d+1, validation unchanged): validation falls, so the
    best weights (epoch 3) are not the last (epoch 5)."""
    import tensorflow as tf

    from hrnet import data
    from hrnet.data.convert import convert_dataset
    from hrnet.evaluate import evaluate
    from hrnet.export import export_model
    from hrnet.train.loop import train

    shifted = tmp_path / "shifted"
    for split in ("train", "validation"):
        for c in range(10):
            target = (c + 1) % 10 if split == "train" else c
            shutil.copytree(digits.jpeg / split / str(c), shifted / split / str(target))
    convert_dataset(str(shifted), str(tmp_path / "shifted-records"), train_shards=2, validation_shards=2,
                    workers=1, progress=False)
    out = str(tmp_path / "run")
    run = {"out": out, "model": TINY_CONFIG, "image_size": 32, "batch_size": 16,
           "nb_train_samples": 320, "lr": 0.1, "lr_decay": 1.0, "flip": False, "area_range": [0.35, 1.0],
           "log_every": 10, "checkpoint_every": 100, "seed": 0}  # 20 steps per epoch; every epoch validated
    train(dict(run, data=str(digits.records), epochs=3))
    manifest = train(dict(run, data=str(tmp_path / "shifted-records"), epochs=5))  # resumes at step 60

    validations = read_history(out, validation=True)
    assert [v["step"] for v in validations] == [20, 40, 60, 80, 100]
    assert all(v["val_count"] == 359 for v in validations)
    best, last = manifest["best"], manifest["validation"]
    top = max(validations, key=lambda v: v["val_top1"])
    assert best["step"] == top["step"] <= 60 and best["val_top1"] == top["val_top1"]
    assert last["step"] == 100 and last["val_top1"] < best["val_top1"] - 0.1, validations
    assert {"best.index", "best.json"} <= set(os.listdir(out))

    # The same protocol (and batch size) on the saved weights gives what validation recorded.
    for which, expected in (("best", best), ("last", last)):
        metrics = evaluate(str(digits.records), out, batch_size=16, weights=which)
        assert (metrics["weights"], metrics["step"]) == (which, expected["step"])
        assert metrics["top1"] == expected["val_top1"] and metrics["top5"] == expected["val_top5"]
    assert _event_steps(pathlib.Path(out) / "logs", "validation/top1") == [20, 40, 60, 80, 100]

    exported = export_model(out, str(tmp_path / "export"), onnx=False)  # the best weights, by default
    assert (exported["weights"], exported["step"]) == ("best", best["step"])
    serve = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["serving_default"]
    info = data.dataset_info(str(digits.records), splits=("validation",))
    hits = sum(int(np.sum(np.argmax(serve(images=images)["logits"].numpy(), axis=1) == labels.numpy()))
               for images, labels in data.eval_dataset(info, batch_size=16, image_size=32))
    assert hits / 359 == best["val_top1"]


def test_bf16_validation_runs_the_bn_folded_model_of_the_weights_it_validates(digits, tmp_path, caplog):
    """Under mixed_bfloat16 validation runs a BN-folded copy (4x faster on AMX), built at the
    first validation and folded again before each later one: each recorded figure is what a
    fresh fold of the weights saved at that step gives."""
    import logging

    import tensorflow as tf

    from hrnet import data
    from hrnet.compat import set_mixed_precision
    from hrnet.evaluate import load_checkpoint_model, tally, top_k_predictor
    from hrnet.model import fold_batch_norm
    from hrnet.train.loop import train

    out = str(tmp_path / "run")  # 6 steps per epoch: validations at 6 and 12
    with caplog.at_level(logging.INFO, logger="hrnet.train.loop"):
        manifest = train({"data": str(digits.records), "out": out, "model": TINY_CONFIG, "image_size": 32,
                          "batch_size": 8, "nb_train_samples": 48, "train_steps": 12, "eval_every": 1,
                          "lr": 0.05, "log_every": 6, "checkpoint_every": 6, "precision": "bf16", "seed": 2})
    assert sum("BN folded" in r.getMessage() for r in caplog.records) == 1
    validations = {v["step"]: v for v in read_history(out, validation=True)}
    assert sorted(validations) == [6, 12]
    info = data.dataset_info(str(digits.records), splits=("validation",))
    set_mixed_precision("mixed_bfloat16")
    try:
        model, ckpt, _ = load_checkpoint_model(out, which="last")
        for step in (6, 12):  # the checkpoints written at the validated steps
            tf.train.Checkpoint(model=model).read(os.path.join(out, "ckpt-%d" % step)).expect_partial()
            folded = fold_batch_norm(model, ckpt["model_config"])
            assert folded.get_layer("conv1").compute_dtype == "bfloat16"
            result = tally(top_k_predictor(folded, 32, 10), data.eval_dataset(info, batch_size=8, image_size=32),
                           10, 359, "validation", 8)
            assert (result.top1, result.top5) == (validations[step]["val_top1"], validations[step]["val_top5"]), step
    finally:
        set_mixed_precision("float32")
    assert manifest["validation"]["step"] == 12


def test_init_from_keeps_the_backbone_and_reinitialises_another_classifier(digits, tmp_path):
    from hrnet import configs, weights
    from hrnet.model import build_model
    from hrnet.train.start import init_from

    cfg = configs.load(TINY_CONFIG)
    source = build_model(cfg, num_classes=7, input_size=(32, 32))
    weights.save_weights(source, str(tmp_path / "weights"))
    target = build_model(cfg, num_classes=10, input_size=(32, 32))
    before = {k: np.array(v.numpy()) for k, v in weights.model_weights(target)}
    init_from(target, str(tmp_path), 10)  # a folder holding `weights`, as import-weights writes
    src = dict(weights.model_weights(source))
    for key, var in weights.model_weights(target):
        if key.startswith("classifier/"):
            np.testing.assert_array_equal(var.numpy(), before[key])  # left as initialised
        else:
            np.testing.assert_array_equal(var.numpy(), src[key].numpy())
    same = build_model(cfg, num_classes=7, input_size=(32, 32))
    init_from(same, str(tmp_path / "weights"), 7)
    np.testing.assert_array_equal(same.get_layer("classifier").kernel.numpy(),
                                  source.get_layer("classifier").kernel.numpy())


FAKE_NPU = r'''
"""A stand-in for the Ascend adapter's npu_device: records every call made to it."""
import os
from types import SimpleNamespace

CALLS = []


class _Options:
    def __setattr__(self, key, value):
        CALLS.append(("option", key, value))
        object.__setattr__(self, key, value)


_OPTIONS = _Options()


def global_options():
    return _OPTIONS


class _Handle:
    def __init__(self):
        self.workers_num = int(os.environ.get("RANK_SIZE", "1"))
        self.worker_id = int(os.environ.get("RANK_ID", "0"))

    def as_default(self):
        CALLS.append(("as_default",))
        return self


def open(device_id=None):
    CALLS.append(("open", os.environ.get("ASCEND_DEVICE_ID")))
    return _Handle()


def _all_reduce(values, reduction="mean", fusion=1, fusion_id=-1, group="hccl_world_group"):
    CALLS.append(("all_reduce", len(values), reduction))
    return values  # one process plays every rank: the mean of equal gradients


def set_npu_loop_size(loop_size):
    CALLS.append(("loop_size", loop_size))


def _broadcast(values, root_rank=0, fusion=2, fusion_id=0, group="hccl_world_group"):
    CALLS.append(("broadcast", len(values), root_rank))


def _loss_scale_optimizer(inner, dynamic=True, initial_scale=None, dynamic_growth_steps=None):
    from hrnet.compat import keras

    CALLS.append(("NpuLossScaleOptimizer", dynamic))
    return keras.mixed_precision.LossScaleOptimizer(inner)


distribute = SimpleNamespace(all_reduce=_all_reduce, broadcast=_broadcast)
train = SimpleNamespace(optimizer=SimpleNamespace(NpuLossScaleOptimizer=_loss_scale_optimizer))
'''


@pytest.mark.keras2  # the Ascend image runs Keras 2
def test_npu_backend_drives_the_adapter_api(digits, tmp_path, monkeypatch):
    """What this proves: the seam calls npu_device's documented API in the right order
    with the right arguments and trains through it. What it cannot: the adapter, HCCL
    or an Ascend chip (none here)."""
    (tmp_path / "fake" / "npu_device").mkdir(parents=True)
    (tmp_path / "fake" / "npu_device" / "__init__.py").write_text(FAKE_NPU)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "npu_device", raising=False)
    for key, value in {"RANK_SIZE": "2", "RANK_ID": "0", "ASCEND_DEVICE_ID": "3",
                       "RANK_TABLE_FILE": str(tmp_path / "rank_table.json")}.items():
        monkeypatch.setenv(key, value)
    import npu_device

    monkeypatch.setitem(sys.modules, "npu_device", npu_device)  # gone again after the test
    from hrnet import configs
    from hrnet.model import build_model
    from hrnet.train.loop import train

    model = build_model(configs.load(TINY_CONFIG), num_classes=10, input_size=(32, 32))
    out = str(tmp_path / "run")
    manifest = train({"data": str(digits.records), "out": out, "model": TINY_CONFIG,
                      "image_size": 32, "device": "npu", "batch_size": 4, "train_steps": 5, "log_every": 2,
                      "seed": 1})
    calls = npu_device.CALLS
    kinds = [c[0] for c in calls]
    assert calls[0] == ("option", "precision_mode", "allow_mix_precision")  # npu default: mixed precision
    assert kinds.index("open") < kinds.index("as_default") < kinds.index("NpuLossScaleOptimizer")
    assert ("open", "3") in calls and ("NpuLossScaleOptimizer", True) in calls
    assert ("broadcast", len(model.variables), 0) in calls  # rank 0's initial values, all variables
    assert kinds.index("broadcast") < kinds.index("all_reduce")
    assert ("all_reduce", len(model.trainable_variables), "mean") in calls
    # Rank 0 of 2: the global batch and the lr count both ranks' devices.
    assert manifest["num_replicas"] == 2 and manifest["global_batch_size"] == 8
    assert read_history(out)[0]["lr"] == pytest.approx(0.1 * 8 / 256)
    assert all("loss_scale" in h and np.isfinite(h["loss"]) for h in read_history(out))
    # Loop sinking: the loop size announced before each call that changes it (2, 2, then 1 to the end).
    assert [c for c in calls if c[0] == "loop_size"] == [("loop_size", 2), ("loop_size", 1)]
    assert [h["step"] for h in read_history(out)] == [2, 4, 5] and manifest["optimizer_iterations"] == 5


def test_device_errors_are_clear(monkeypatch):
    import tensorflow as tf

    from hrnet.errors import HrnetError
    from hrnet.runtime import devices

    monkeypatch.delitem(sys.modules, "npu_device", raising=False)
    with pytest.raises(HrnetError, match="needs the Ascend TensorFlow adapter"):
        devices.setup("npu")
    with pytest.raises(HrnetError, match="unknown device"):
        devices.setup("tpu")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]}}))
    assert devices.tf_config_workers() == 2
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(HrnetError, match="TF_CONFIG is not valid JSON"):
        devices.tf_config_workers()
    if not tf.config.list_physical_devices("GPU"):
        with pytest.raises(HrnetError, match="sees no GPU"):
            devices.setup("gpu")

"""The whole pipeline on this machine (kfp.local SubprocessRunner) on the demo digits:
validate -> convert -> train -> evaluate -> export, then the exit handler.

The same code path as ``python -m pipelines run-local``, with a shorter training run.
"""
import glob
import io
import json
import os
import subprocess
import sys

import pytest
from helpers import kill_when

from pipelines.__main__ import DEMO, run_local

pytestmark = pytest.mark.slow

# Fewer epochs than the README's demo: far above chance (10%) already, and quick on 2 cores.
# Progress every 3 steps (30 lines): more than the console shows.
SHORT = dict(DEMO, epochs=2.0, train_config=dict(DEMO["train_config"], log_every=3))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run-local")
    console = io.StringIO()  # the short account run-local prints (its default)
    # A local folder stands in for the bucket a cluster run mirrors its checkpoints to.
    return dict(run_local(str(workdir), checkpoint_uri=str(workdir / "checkpoints"), console=console, **SHORT),
                checkpoint_uri=str(workdir / "checkpoints"), console=console.getvalue())


def step_dir(run, step):
    (path,) = glob.glob(os.path.join(run["run_dir"], step))
    return path


def test_the_run_learns_the_digits(demo_run):
    assert demo_run["count"] == 359  # every validation image, once
    assert demo_run["top1"] >= 0.6, demo_run  # about 0.8 after 2 epochs
    assert demo_run["top5"] >= demo_run["top1"]


def test_the_console_gets_a_short_account_and_each_step_its_whole_log(demo_run):
    lines = demo_run["console"].splitlines()
    # deploy runs as a step that, not asked to serve (deploy=false), says so and touches nothing.
    steps = ["validate", "prepare-data", "train", "evaluate", "export", "deploy", "record-run"]
    done = [ln.split()[0] for ln in lines if " done in " in ln]
    # evaluate and export both follow train, in either order
    assert done[:3] == steps[:3] and sorted(done[3:5]) == steps[3:5] and done[5:] == steps[5:], lines
    assert sum("validation at step" in ln for ln in lines) == 2  # 2 epochs, one validation each
    assert 3 <= sum(ln.strip().startswith("step ") for ln in lines) <= 11  # rank 0's, thinned
    assert len(lines) < 30 and not [ln for ln in lines if "executor_input" in ln or "cuda" in ln.lower()]
    logs = demo_run["logs"]
    assert sorted(os.listdir(logs)) == sorted(f"{s}.log" for s in steps + ["pipeline"])
    with open(os.path.join(logs, "train.log")) as f:
        train_log = f.read()
    assert "Executing task 'train'" in train_log and '"parameterValues"' in train_log
    assert train_log.count(" INFO hrnet.train.loop: step ") == 30


def test_a_failed_step_ends_the_run_at_once_with_its_error_line(tmp_path):
    """Bad input fails the train step: no retry here (a retry waits 150 s), and the console
    shows hrnet's one error line, not the executor's traceback. The data: shards named as
    slim names them, so prepare-data takes them as records, without the labels or manifest
    that would say their classes."""
    slim = tmp_path / "slim-records"
    slim.mkdir()
    for split in ("train", "validation"):
        (slim / f"{split}-00000-of-00001").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "pipelines", "run-local", "--workdir", str(tmp_path / "w"),
                           "--data-uri", str(slim)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hrnet train: error: " in done.stdout and "give num_classes and label_offset" in done.stdout
    assert "Traceback" not in done.stdout and "FAILURE" in done.stderr
    (train_log,) = glob.glob(str(tmp_path / "w" / "logs" / "*" / "train*.log"))
    with open(train_log) as f:
        assert f.read().count("Executing task") == 1  # tried once


def test_the_ui_gets_metrics_and_a_report(demo_run):
    evaluate_dir = step_dir(demo_run, "evaluate")
    with open(os.path.join(evaluate_dir, "executor_output.json")) as f:
        outputs = json.load(f)["artifacts"]
    (metrics,) = outputs["metrics"]["artifacts"]
    assert metrics["metadata"]["top1"] == pytest.approx(demo_run["top1"])
    assert metrics["metadata"]["top5"] == pytest.approx(demo_run["top5"])
    with open(os.path.join(evaluate_dir, "evaluation", "metrics.json")) as f:
        per_class = json.load(f)["per_class"]
    assert sorted(per_class, key=int) == [str(d) for d in range(10)]
    assert sum(c["count"] for c in per_class.values()) == 359
    with open(demo_run["report"], encoding="utf-8") as f:
        report = f.read()
    assert f"top-1 <b>{100 * demo_run['top1']:.2f}%</b>" in report
    # The real run's report in headless Chromium: its three figures, the thumbnails of its
    # surest mistakes (real validation digits, each decoded), the per-class table (header +
    # 10 digits), nothing in the console.
    from browser import render

    shown = render(demo_run["report"], os.path.join(os.path.dirname(demo_run["report"]), "report.png"))
    assert shown["problems"] == [] and not shown["overflow"]
    assert [f["id"] for f in shown["figures"]] == ["curves", "confusion", "classes"]
    with open(os.path.join(evaluate_dir, "evaluation", "metrics.json")) as f:
        mistakes = json.load(f)["mistakes"]
    assert 0 < len(mistakes) <= 16 and shown["images"] == [32] * len(mistakes)  # the 32-pixel training crops
    assert shown["tables"]["per-class"] == 11 and "validation top-1" in report
    # The confusion matrix as KFP's ClassificationMetrics (10 classes: under the UI limit) ...
    (confusion,) = outputs["confusion"]["artifacts"]
    matrix = confusion["metadata"]["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == [str(d) for d in range(10)]
    assert sum(sum(r["row"]) for r in matrix["rows"]) == 359
    assert sum(matrix["rows"][d]["row"][d] for d in range(10)) == round(demo_run["top1"] * 359)
    # ... and the Markdown summary.
    (summary,) = outputs["summary"]["artifacts"]
    with open(os.path.join(evaluate_dir, "summary")) as f:
        assert f.read().startswith("# HRNet w18_small_v1")


def test_the_checkpoint_keeps_the_run_settings(demo_run):
    import yaml

    model_dir = os.path.join(step_dir(demo_run, "train"), "model")
    # Mirrored to checkpoint_uri while training, and the finished one in the Model artifact.
    with open(os.path.join(model_dir, "manifest.json")) as a, \
            open(os.path.join(demo_run["checkpoint_uri"], "manifest.json")) as b:
        artifact, mirrored = json.load(a), json.load(b)
    assert artifact == mirrored and artifact["kind"] == "checkpoint"
    with open(os.path.join(model_dir, "train_config.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["model"] == SHORT["model"] and config["image_size"] == SHORT["image_size"]
    assert config["epochs"] == pytest.approx(SHORT["epochs"], rel=0.02)
    assert config["flip"] is False  # from train_config
    with open(os.path.join(model_dir, "history.jsonl")) as f:
        history = [h for h in map(json.loads, f) if "loss" in h]  # the training lines, not validation's
    assert history[-1]["loss"] < history[0]["loss"]


def test_the_export_classifies_jpeg_bytes(demo_run):
    import tensorflow as tf

    exported = demo_run["exported"]
    with open(os.path.join(exported, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["kind"] == "export" and manifest["num_classes"] == 10
    assert os.path.exists(os.path.join(exported, "frozen", "hrnet.pb"))
    assert "atc" in open(os.path.join(exported, "frozen", "atc.sh")).read()
    assert not os.path.exists(os.path.join(exported, "model.onnx"))  # run-local leaves ONNX out
    # The served model agrees with the evaluation: classify the validation JPEGs by their bytes.
    demo = os.path.join(os.path.dirname(demo_run["run_dir"]), os.pardir, "demo-data", "validation")
    files = sorted(glob.glob(os.path.join(demo, "*", "*.jpg")))[::6]
    labels = [int(os.path.basename(os.path.dirname(p))) for p in files]
    images = tf.constant([open(p, "rb").read() for p in files])
    served = tf.saved_model.load(os.path.join(exported, "1")).signatures["classify_bytes"]
    top = served(image_bytes=images)["classes"].numpy()[:, 0]
    accuracy = sum(int(t) == label for t, label in zip(top, labels)) / len(labels)
    assert abs(accuracy - demo_run["top1"]) < 0.15, (accuracy, demo_run["top1"])


def test_the_exit_handler_recorded_success(demo_run):
    with open(os.path.join(step_dir(demo_run, "record-run"), "run_record", "manifest.json")) as f:
        record = json.load(f)
    assert record["state"] == "SUCCEEDED" and record["kind"] == "run-status"


def test_the_data_set_passes_by_reference(demo_run):
    """The Dataset artifact the steps take is a reference (a few kilobytes), not the records."""
    from hrnet.data import reference

    (artifact,) = glob.glob(os.path.join(demo_run["run_dir"], "prepare-data*", "dataset"))
    assert os.listdir(artifact) == [reference.REFERENCE]
    records = reference.resolve(artifact)
    assert os.path.dirname(records) == os.path.dirname(artifact)  # beside it, in the pipeline root
    assert any(name.startswith("train-") for name in os.listdir(records))



# The train component's body as KFP's executor calls it, with artifacts at the given URIs.
_TRAIN_TASK = """
import json, sys
from kfp.dsl import Dataset, Model
from components.train import train
args = json.loads(sys.argv[1])
args["dataset"], args["model"] = Dataset(uri=args["dataset"]), Model(uri=args["model"])
train.python_func(**args)
"""


def test_a_retried_train_step_resumes_with_no_checkpoint_uri(demo_run, tmp_path):
    """A retry of the train task gets the same output URIs; with checkpoint_uri "" the
    checkpoints are mirrored beside its artifact, so the retry resumes instead of starting
    over. The first attempt is killed (its whole process group, as a lost pod) once a
    checkpoint is mirrored."""
    import subprocess
    import sys

    (dataset,) = glob.glob(os.path.join(demo_run["run_dir"], "prepare-data*", "dataset"))
    model = str(tmp_path / "train" / "model")
    config = dict(model="w18_small_v1", device="cpu", batch_size=32, train_steps=20, lr=0.05, precision="fp32",
                  image_size=32, seed=1, flip=False, checkpoint_every=5, log_every=5)
    args = json.dumps(dict(dataset=dataset, model=model, config=config, devices=1, checkpoint_uri=""))
    mirror = tmp_path / "train" / "checkpoints"
    command = [sys.executable, "-c", _TRAIN_TASK, args]
    kill_when(command, (mirror / "checkpoint").exists, tmp_path / "first-try.log", group=True)
    assert not (mirror / "manifest.json").exists()
    retry = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    assert "resuming from ckpt-" in retry.stdout + retry.stderr
    manifest = json.load(open(os.path.join(model, "manifest.json")))
    assert manifest["step"] == 20 and manifest["kind"] == "checkpoint"
    assert [h["step"] for h in map(json.loads, open(mirror / "history.jsonl")) if "loss" in h] == [5, 10, 15, 20]


_OFFICIAL_PTH = """
import sys, numpy, timm, torch
torch.manual_seed(0)
state = timm.create_model("hrnet_w18_small", pretrained=False).state_dict()
torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 99, "optimizer": {}}, sys.argv[1])
numpy.save(sys.argv[1] + ".conv1.npy", state["conv1.weight"].numpy())
"""


@pytest.mark.torch
def test_the_train_step_fine_tunes_from_an_official_pytorch_checkpoint(demo_run, tmp_path, capfd):
    """The pipeline's init_from input: the train task starts from a checkpoint saved the way
    the official training script saves one ({'state_dict', 'epoch', 'optimizer'}, keys with
    DataParallel's `module.`), imported on the fly; the 1000-class head is re-initialised
    for the digits' 10."""
    import subprocess
    import sys

    import numpy as np
    from kfp.dsl import Dataset, Model

    from components.train import train
    from hrnet import weights

    # In a child process: timm segfaults when imported after TensorFlow (as in tests/test_weights.py).
    pth = tmp_path / "official.pth"
    made = subprocess.run([sys.executable, "-c", _OFFICIAL_PTH, str(pth)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    conv1 = np.load(str(pth) + ".conv1.npy").transpose(2, 3, 1, 0)
    (dataset,) = glob.glob(os.path.join(demo_run["run_dir"], "prepare-data*", "dataset"))
    model = tmp_path / "train" / "model"
    # One step at an lr so small that the weights stay the imported ones (up to 1e-6).
    config = dict(model="w18_small_v1", device="cpu", batch_size=8, train_steps=1, lr=1e-9, precision="fp32",
                  image_size=32, seed=1, eval_every=0, init_from=str(pth))
    train.python_func(dataset=Dataset(uri=dataset), model=Model(uri=str(model)), config=config, devices=1,
                      checkpoint_uri="")
    assert "(classifier re-initialised for 10 classes)" in "".join(capfd.readouterr())
    tuned = weights.read_weights(str(model / "weights"))
    np.testing.assert_allclose(tuned["conv1/kernel"], conv1, atol=1e-6)
    assert tuned["classifier/kernel"].shape[-1] == 10

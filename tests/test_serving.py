"""Serving an export: ``hrnet predict`` in-process, and ``hrnet serve`` for real (KServe's
ModelServer in its own process on a free loopback port) over both protocols, checked against
predict and against ``hrnet evaluate`` on the same images. What is not here: KServe's
InferenceService controller (no Kubernetes API server runs here)."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import TINY_RUN_CLASSES
from s3server import free_port

pytest.importorskip("kserve")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    from hrnet.export import export_model

    out = tmp_path_factory.mktemp("serving") / "export"
    export_model(str(tiny_run / "ckpt"), str(out))  # with model.onnx where tf2onnx is installed
    return out


def _validation(tiny_run):
    """(path, class folder name) of every validation JPEG, in predict's order (sorted walk)."""
    root = tiny_run / "tree" / "validation"
    return [(str(root / c / f), c) for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))]


def _rows(text):
    import csv

    return list(csv.DictReader(io.StringIO(text)))


def test_the_export_is_a_storage_uri(exported):
    """KServe's TensorFlow runtime (and TF Serving) load <storageUri>/<version>/saved_model.pb."""
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["saved_model"]["path"] == "1" and manifest["saved_model"]["version"] == 1
    assert (exported / "1" / "saved_model.pb").is_file() and not (exported / "saved_model").exists()


def test_predict_gives_evaluate_top1_and_reports_bad_images_without_stopping(tiny_run, exported, tmp_path):
    from hrnet.evaluate import evaluate
    from hrnet.serving.predict import predict

    out = io.StringIO()
    good, bad = predict(str(exported), [str(tiny_run / "tree" / "validation")], out, batch_size=7, progress=False)
    rows = _rows(out.getvalue())
    images = _validation(tiny_run)
    assert (good, bad) == (len(images), 0) and [r["path"] for r in rows] == [p for p, _ in images]
    top1 = sum(r["name_1"] == label for r, (_, label) in zip(rows, images)) / len(images)
    metrics = evaluate(str(tiny_run / "records"), str(tiny_run / "ckpt"), batch_size=16)
    assert top1 == metrics["top1"]
    probabilities = [float(r["probability_%d" % k]) for r in rows for k in (1, 2)]
    assert all(0 <= p <= 1 for p in probabilities) and all(
        float(r["probability_1"]) >= float(r["probability_2"]) for r in rows)

    # A corrupt JPEG and a text file among good images: a row each with its error, the rest classified.
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_run / "tree" / "validation" / "class_0", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "notes.txt").write_text("left out: not an image's name")
    out = io.StringIO()
    good, bad = predict(str(exported), [str(folder)], out, fmt="json", top_k=3, progress=False)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (good, bad) == (len(lines) - 1, 1)
    (broken,) = [x for x in lines if "error" in x]
    assert broken["path"].endswith("broken.jpg") and broken["error"]
    assert all(len(x["classes"]) == 3 for x in lines if "error" not in x)


def test_onnx_runtime_gives_the_savedmodels_top1_on_every_image(tiny_run, exported):
    pytest.importorskip("onnxruntime")
    from hrnet.serving.predict import predict

    images = [p for p, _ in _validation(tiny_run)] + [str(tiny_run / "tree" / "train")]
    rows = {}
    for runtime in ("savedmodel", "onnxruntime"):
        out = io.StringIO()
        predict(str(exported), images, out, top_k=2, batch_size=5, progress=False, runtime=runtime)
        rows[runtime] = _rows(out.getvalue())
    assert len(rows["savedmodel"]) == len(rows["onnxruntime"]) > 50
    for ours, theirs in zip(rows["savedmodel"], rows["onnxruntime"]):
        assert (ours["path"], ours["class_1"], ours["name_1"]) == (theirs["path"], theirs["class_1"], theirs["name_1"])
        assert abs(float(ours["probability_1"]) - float(theirs["probability_1"])) < 1e-5


def test_auto_runtime_is_the_faster_one_whose_logits_agree_and_says_why(exported):
    import numpy as np

    from hrnet.errors import HrnetError
    from hrnet.serving import runtimes
    from hrnet.serving.exported import Exported

    pytest.importorskip("onnxruntime")
    loaded = Exported(str(exported))
    assert loaded.runtime.name in ("savedmodel", "onnxruntime") and "faster here" in loaded.runtime.reason
    manifest = loaded.manifest
    # A model.onnx that computes something else is never picked, however fast.
    choice, onnx = runtimes.choose("auto", str(exported), manifest, lambda x: loaded._savedmodel_logits(x) + 1.0)
    assert (choice.name, onnx) == ("savedmodel", None) and "differ" in choice.reason
    # An export without model.onnx serves on the SavedModel, or refuses when ONNX is asked for by name.
    bare = {k: v for k, v in manifest.items() if k != "onnx"}
    bare["onnx_skipped"] = "not asked for"
    choice, _ = runtimes.choose("auto", str(exported), bare, loaded._savedmodel_logits)
    assert choice == runtimes.Choice("savedmodel", "the export has no model.onnx (not asked for)")
    with pytest.raises(HrnetError, match="runtime onnxruntime: the export has no model.onnx"):
        runtimes.choose("onnxruntime", str(exported), bare, loaded._savedmodel_logits)
    # Preprocessed images (the V1 / V2 tensor requests) give the same logits on both.
    images = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(Exported(str(exported), "onnxruntime").logits(images)["logits"],
                               Exported(str(exported), "savedmodel").logits(images)["logits"], rtol=1e-4, atol=1e-5)


def test_predict_command_refuses_what_it_cannot_read_in_one_line(tiny_run, exported, tmp_path):
    (tmp_path / "empty").mkdir()
    image = _validation(tiny_run)[0][0]
    for args, expected in ((["--model", str(exported), str(tmp_path / "empty")], "no image files in"),
                           (["--model", str(exported), str(tmp_path / "nope.jpg")], "no such image file or folder"),
                           (["--model", str(tmp_path), image], "manifest.json")):
        done = subprocess.run([sys.executable, "-m", "hrnet", "predict", *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr


def _request(port, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """``hrnet serve`` on a free loopback port; (port, its log file)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hrnet", "serve", "--model", str(exported), "--port",
                                 str(port), "--name", "digits"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                status, _ = _request(port, "/v2/health/ready")
                if status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_served_predictions_equal_predict_over_both_protocols(tiny_run, exported, server):
    from hrnet.serving.predict import predict

    port, log = server
    # Ready only once loaded: the load's line is in the log before anything answered.
    assert "loaded " + str(exported) in log.read_text()
    assert "with savedmodel (" in log.read_text() or "with onnxruntime (" in log.read_text()
    assert _request(port, "/v1/models/digits") == (200, {"name": "digits", "ready": True})
    images = _validation(tiny_run)
    encoded = [base64.b64encode(open(p, "rb").read()).decode() for p, _ in images]
    out = io.StringIO()
    predict(str(exported), [p for p, _ in images], out, progress=False)
    expected = [(r["class_1"], r["name_1"]) for r in _rows(out.getvalue())]

    status, v1 = _request(port, "/v1/models/digits:predict", {"instances": [{"b64": e} for e in encoded]})
    assert status == 200, v1
    assert [(str(p["classes"][0]), p["names"][0]) for p in v1["predictions"]] == expected
    assert all(len(p["classes"]) == min(5, TINY_RUN_CLASSES) for p in v1["predictions"])

    status, v2 = _request(port, "/v2/models/digits/infer", {"inputs": [
        {"name": "image_bytes", "shape": [len(encoded)], "datatype": "BYTES", "data": encoded}]})
    assert status == 200, v2
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert outputs["classes"]["shape"] == [len(encoded), min(5, TINY_RUN_CLASSES)]
    names = outputs["names"]["data"]
    classes = outputs["classes"]["data"]
    k = outputs["classes"]["shape"][1]
    assert [(str(classes[i * k]), names[i * k]) for i in range(len(encoded))] == expected


def test_served_tensors_give_the_logits_of_the_model(tiny_run, exported, server):
    import numpy as np
    import tensorflow as tf

    from hrnet.data import preprocess_for_eval
    from hrnet.serving.exported import Exported

    port, _ = server
    path, _ = _validation(tiny_run)[0]
    image = preprocess_for_eval(tf.constant(open(path, "rb").read()), 32).numpy()
    want = Exported(str(exported)).logits(image[None])["logits"][0]
    status, v1 = _request(port, "/v1/models/digits:predict", {"instances": [image.tolist()]})
    assert status == 200, v1
    np.testing.assert_allclose(v1["predictions"][0]["logits"], want, rtol=1e-5, atol=1e-5)
    status, v2 = _request(port, "/v2/models/digits/infer", {"inputs": [
        {"name": "images", "shape": [1, 32, 32, 3], "datatype": "FP32", "data": image.reshape(-1).tolist()}]})
    assert status == 200, v2
    (logits,) = [o for o in v2["outputs"] if o["name"] == "logits"]
    np.testing.assert_allclose(logits["data"], want, rtol=1e-5, atol=1e-5)


def test_a_malformed_request_is_a_4xx_naming_it_and_the_server_goes_on(tiny_run, server):
    port, _ = server
    good = base64.b64encode(open(_validation(tiny_run)[0][0], "rb").read()).decode()
    for body, raw, words in (
            ({"instances": [{"b64": "not base64 !!"}]}, None, "not valid base64"),
            ({"instances": [{"b64": base64.b64encode(b"plain text").decode()}]}, None, "not an image"),
            ({"instances": [[[0.0, 1.0]]]}, None, "expected shape [N, 32, 32, 3]"),
            ({"instances": []}, None, "at least one instance"),
            (None, b"{not json", None)):
        status, answer = _request(port, "/v1/models/digits:predict", body, raw)
        assert 400 <= status < 500, (body, status, answer)
        if words:
            assert words in json.dumps(answer), answer
    status, answer = _request(port, "/v2/models/digits/infer", {"inputs": [
        {"name": "pixels", "shape": [1], "datatype": "BYTES", "data": [good]}]})
    assert 400 <= status < 500 and "image_bytes" in json.dumps(answer), answer
    status, answer = _request(port, "/v1/models/digits:predict", {"instances": [{"b64": good}]})
    assert status == 200 and len(answer["predictions"]) == 1

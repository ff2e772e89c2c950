"""hrnet evaluate and hrnet export on a checkpoint made by ``hrnet.train.loop.train``.

On conftest's tiny_run: 6 classes of real JPEGs (random textures tinted per class),
validation split in 3 shards of uneven size so that the eval stream's file order and its
last partial batch both matter; a tiny HRNet trained for two steps (what it predicts does
not matter; that evaluate and export reproduce it exactly does).
"""
import io
import json
import os

import numpy as np
import pytest
from helpers import TINY_RUN_CLASSES, TINY_RUN_VALIDATION

CLASSES = TINY_RUN_CLASSES


def _validation_jpegs(root):
    """(bytes, label) of every validation image, straight from the JPEG tree."""
    out = []
    for label in range(CLASSES):
        folder = root / "tree" / "validation" / ("class_%d" % label)
        out += [((folder / f).read_bytes(), label) for f in sorted(os.listdir(folder))]
    return out


def test_evaluate_counts_every_validation_record_once_and_matches_per_image_predictions(tiny_run, tmp_path):
    import tensorflow as tf

    from hrnet.data import preprocess_for_eval
    from hrnet.evaluate import evaluate, load_checkpoint_model

    metrics = evaluate(str(tiny_run / "records"), str(tiny_run / "ckpt"), out=str(tmp_path / "eval"), batch_size=4)
    assert metrics["count"] == sum(TINY_RUN_VALIDATION) == 23
    assert [metrics["per_class"][str(c)]["count"] for c in range(CLASSES)] == TINY_RUN_VALIDATION
    assert [metrics["per_class"][str(c)]["name"] for c in range(CLASSES)] == ["class_%d" % c for c in range(CLASSES)]

    # Reference: each image on its own, from its JPEG bytes, through the same eval preprocessing.
    model, _, _ = load_checkpoint_model(str(tiny_run / "ckpt"))
    samples = _validation_jpegs(tiny_run)
    images = tf.stack([preprocess_for_eval(tf.constant(data), 32) for data, _ in samples])
    ranked = np.argsort(-model(images, training=False).numpy(), axis=1)  # inference mode: per-image results
    labels = np.array([label for _, label in samples])
    top1 = int((ranked[:, 0] == labels).sum())
    top5 = int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
    correct = np.bincount(labels[ranked[:, 0] == labels], minlength=CLASSES)
    assert metrics["top1"] == pytest.approx(top1 / 23) and metrics["top5"] == pytest.approx(top5 / 23)
    assert [metrics["per_class"][str(c)]["correct"] for c in range(CLASSES)] == correct.tolist()

    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["count"] == 23 and written["top1"] == metrics["top1"]
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["kind"] == "evaluation" and manifest["step"] == 2
    # The report's mistakes: the wrong ones with the lowest probability of their true class, surest first.
    probabilities = tf.nn.softmax(model(images, training=False)).numpy()
    wrong = np.nonzero(ranked[:, 0] != labels)[0]
    surest = wrong[np.argsort(probabilities[wrong, labels[wrong]], kind="stable")][:16]
    mistakes = written["mistakes"]
    # (The reference reads the images in another order than the records: compared by content.)
    assert len(surest) == len(mistakes) == 16 and len({m["position"] for m in mistakes}) == 16
    assert [(m["true"], m["predicted"]) for m in mistakes] == list(zip(labels[surest].tolist(),
                                                                       ranked[surest, 0].tolist()))
    assert [m["true_probability"] for m in mistakes] == pytest.approx(probabilities[surest, labels[surest]].tolist(),
                                                                      abs=1e-4)
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {"metrics.json"} | {m["image"] for m in mistakes}
    assert all((tmp_path / "eval" / m["image"]).read_bytes().startswith(b"\x89PNG") for m in mistakes)


def test_evaluate_refuses_mismatched_or_incomplete_inputs(tiny_run, tmp_path):
    import shutil

    from hrnet.errors import HrnetError, IncompleteError
    from hrnet.evaluate import evaluate

    partial = tmp_path / "partial"
    shutil.copytree(tiny_run / "ckpt", partial)
    os.remove(partial / "manifest.json")  # a run that never finished
    with pytest.raises(IncompleteError, match="incomplete"):
        evaluate(str(tiny_run / "records"), str(partial))
    other = json.loads((tiny_run / "ckpt" / "manifest.json").read_text())
    other["num_classes"] = 10
    shutil.copytree(tiny_run / "ckpt", tmp_path / "ten")
    (tmp_path / "ten" / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(HrnetError, match="trained on 10 classes, but the data set .* has 6"):
        evaluate(str(tiny_run / "records"), str(tmp_path / "ten"))


@pytest.mark.keras2  # training, checkpoint and export under the Ascend image's Keras 2
def test_exported_saved_model_reproduces_the_model_on_real_jpeg_bytes(tiny_run, tmp_path):
    import tensorflow as tf
    from PIL import Image

    from hrnet.data import preprocess_for_eval
    from hrnet.evaluate import load_checkpoint_model
    from hrnet.export import export_model

    manifest = export_model(str(tiny_run / "ckpt"), str(tmp_path / "export"), onnx=False)
    assert manifest["kind"] == "export" and manifest["image_size"] == 32 and manifest["num_classes"] == CLASSES
    on_disk = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert {e["path"] for e in on_disk["files"]} >= {"1/saved_model.pb", "frozen/hrnet.pb",
                                                     "frozen/nodes.json", "frozen/atc.sh"}
    model, _, _ = load_checkpoint_model(str(tiny_run / "ckpt"))
    loaded = tf.saved_model.load(str(tmp_path / "export" / "1"))
    assert set(loaded.signatures) == {"serving_default", "classify_bytes"}

    # Real JPEG bytes (and one PNG) of different sizes -> top-5 ids, names, probabilities.
    samples = [data for data, _ in _validation_jpegs(tiny_run)[:6]]
    png = io.BytesIO()
    Image.open(io.BytesIO(samples[0])).resize((64, 50)).save(png, format="PNG")
    samples.append(png.getvalue())
    result = loaded.signatures["classify_bytes"](image_bytes=tf.constant(samples))
    images = tf.stack([preprocess_for_eval(tf.constant(b), 32) for b in samples])
    expected = tf.nn.softmax(model(images, training=False)).numpy()
    top = np.argsort(-expected, axis=1)[:, :5]
    classes = result["classes"].numpy()
    # The classes returned are the five most probable (ties, which a barely trained model
    # has, may be broken either way), in order, with their probabilities.
    np.testing.assert_allclose(np.take_along_axis(expected, classes, 1), np.take_along_axis(expected, top, 1),
                               atol=1e-6)
    assert all(len(set(row)) == 5 for row in classes.tolist())
    np.testing.assert_allclose(result["probabilities"].numpy(), np.take_along_axis(expected, top, 1), atol=1e-5)
    names = [[n.decode() for n in row] for row in result["names"].numpy()]
    assert names == [["class_%d" % c for c in row] for row in classes]

    # The float-image signature: logits and probabilities of the in-memory model.
    batch = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    served = loaded.signatures["serving_default"](images=tf.constant(batch))
    reference = model(batch, training=False).numpy()
    np.testing.assert_allclose(served["logits"].numpy(), reference, atol=1e-4)
    np.testing.assert_allclose(served["probabilities"].numpy(), tf.nn.softmax(reference).numpy(), atol=1e-5)

    # The frozen graph (what ATC converts): same logits through its named nodes, batch 1.
    nodes = json.loads((tmp_path / "export" / "frozen" / "nodes.json").read_text())
    assert nodes["inputs"] == ["images:0"] and nodes["input_shape"] == [1, 32, 32, 3]
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((tmp_path / "export" / "frozen" / "hrnet.pb").read_bytes())
    assert not [n.name for n in graph_def.node if n.op in ("VarHandleOp", "ReadVariableOp")]  # all constants
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        frozen = session.run(nodes["outputs"][0], {nodes["inputs"][0]: batch[:1]})
    np.testing.assert_allclose(frozen, reference[:1], atol=1e-4)
    atc = (tmp_path / "export" / "frozen" / "atc.sh").read_text()
    assert '--input_shape="images:1,32,32,3"' in atc and "--framework=3" in atc and "--model=hrnet.pb" in atc
    assert '--out_nodes="%s"' % nodes["outputs"][0] in atc


def test_onnx_export_matches_when_tf2onnx_is_installed(tiny_run, tmp_path):
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    from hrnet.evaluate import load_checkpoint_model
    from hrnet.export import export_model

    manifest = export_model(str(tiny_run / "ckpt"), str(tmp_path / "export"))
    assert "onnx" in manifest, manifest.get("onnx_skipped")
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    (logits,) = session.run(None, {session.get_inputs()[0].name: batch})
    model, _, _ = load_checkpoint_model(str(tiny_run / "ckpt"))
    np.testing.assert_allclose(logits, model(batch, training=False).numpy(), atol=1e-4)


def test_imported_weights_are_evaluated_directly_on_slim_style_records(tiny_run, tmp_path, capsys):
    """The first thing a user does: `hrnet import-weights`, then `hrnet evaluate --weights` on
    records laid out as slim writes them (labels 1..N, no manifest.json), no training step.
    The weights here are the checkpoint's, written as import-weights writes them."""
    import shutil

    from hrnet import cli, weights
    from hrnet.data.convert import convert_dataset
    from hrnet.evaluate import evaluate, load_checkpoint_model
    from hrnet.manifest import file_entry, write_manifest

    model, ckpt, _ = load_checkpoint_model(str(tiny_run / "ckpt"))
    imported = tmp_path / "imported"
    imported.mkdir()
    weights.save_weights(model, str(imported / "weights"))
    write_manifest(str(imported), {
        "kind": "weights", "model": ckpt["model"], "model_config": ckpt["model_config"],
        "num_classes": CLASSES, "image_size": 32, "weights": "weights",
        "files": [file_entry(str(imported / f), str(imported)) for f in sorted(os.listdir(imported))
                  if f.startswith("weights.")]})
    slim = tmp_path / "slim"
    convert_dataset(str(tiny_run / "tree"), str(slim), validation_shards=3, workers=1, progress=False, label_offset=1)
    for name in os.listdir(slim):  # slim's records have no manifest and none of our bookkeeping
        if not name.startswith(("train-", "validation-")):
            path = slim / name
            shutil.rmtree(path) if path.is_dir() else os.remove(path)

    ours = evaluate(str(tiny_run / "records"), str(tiny_run / "ckpt"), batch_size=5)
    theirs = evaluate(str(slim), str(imported), batch_size=5, label_offset=1)
    assert (theirs["count"], theirs["top1"], theirs["top5"]) == (ours["count"], ours["top1"], ours["top5"])
    # Class names come from the synset and text each slim record carries (there is no labels.txt).
    names = [(c["name"], c["text"]) for _, c in sorted(ours["per_class"].items(), key=lambda kv: int(kv[0]))]
    assert [(c["name"], c["text"]) for _, c in sorted(theirs["per_class"].items(), key=lambda kv: int(kv[0]))] \
        == names and names[0][0] != "0"
    assert theirs["confusion_matrix"]["classes"] == [n for n, _ in names]
    # The same through the command line; without the offset it says what it needs.
    assert cli.main(["evaluate", "--data", str(slim), "--weights", str(imported), "--label-offset", "1",
                     "--num-classes", str(CLASSES)]) == 0
    assert cli.main(["evaluate", "--data", str(slim), "--weights", str(imported)]) == 2
    assert "give --label-offset" in capsys.readouterr().err
    # A wrong --out is refused before the evaluation, and nothing is left behind there.
    assert cli.main(["evaluate", "--data", str(slim), "--weights", str(imported), "--label-offset", "1",
                     "--out", str(tiny_run / "ckpt")]) == 2
    assert "already holds a checkpoint output" in capsys.readouterr().err

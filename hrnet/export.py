"""``hrnet export``: a checkpoint as a SavedModel, a frozen graph for Ascend ATC, and ONNX.

    hrnet export --checkpoint DIR --out DIR [--version 1|step] [--atc-batch-size 1] [--soc-version Ascend910]

- ``<version>/`` (a positive integer: 1 unless ``--version`` says otherwise, or the weights'
  training step) the SavedModel, in the layout TensorFlow Serving and KServe's TensorFlow
  runtime load (``<storageUri>/<version>/saved_model.pb``): the export's folder or URI is
  directly a ``storageUri``. Two signatures:
  ``serving_default``: ``images`` float32 [N, H, W, 3], RGB normalized as in training
  ((x / 255 - mean) / std) -> ``logits`` and ``probabilities`` [N, classes];
  ``classify_bytes``: ``image_bytes`` string [N] (encoded JPEG / PNG / BMP / GIF) ->
  ``classes`` int32 [N, 5], ``names`` string [N, 5], ``probabilities`` float32 [N, 5], using
  hrnet.data's evaluation preprocessing (decode, resize the shorter side, center crop).
- ``frozen/hrnet.pb``: the float-images graph with the weights folded in as constants and a
  fixed batch size (what ATC wants), ``frozen/nodes.json`` (input / output node names and
  shapes) and ``frozen/atc.sh`` (the ATC command line for Ascend offline conversion).
- ``model.onnx`` when tf2onnx is installed (the ``onnx`` extra); the manifest says why not
  otherwise.
- ``manifest.json`` describing all of them, written last.
"""
import json
import logging
import os
import shutil
from typing import Any, Dict, List

from hrnet import storage
from hrnet.errors import HrnetError

log = logging.getLogger(__name__)

TOP_K = 5
FROZEN_NAME = "hrnet.pb"
ONNX_OPSET = 13
DEFAULT_VERSION = 1


def _class_names(checkpoint_dir: str, num_classes: int) -> List[str]:
    """Readable class names by 0-based label, from the checkpoint's labels.txt."""
    from hrnet.data import schema

    path = os.path.join(checkpoint_dir, schema.LABELS_FILE)
    if not os.path.exists(path):
        return [str(i) for i in range(num_classes)]
    rows = schema.parse_labels_file(path)
    names = [(r[2] if len(r) > 2 and r[2] else r[1]) for r in rows]
    if len(names) != num_classes:
        raise HrnetError("%s lists %d classes, the checkpoint has %d" % (path, len(names), num_classes))
    return names


def decode_batch(image_bytes, image_size: int):
    """Encoded images (string [N]) -> float32 [N, size, size, 3], as evaluation preprocesses
    them: the classify_bytes signature's first half, and what a runtime other than the
    SavedModel's is fed (hrnet.serving.exported)."""
    import tensorflow as tf

    from hrnet.data import preprocess_for_eval

    return tf.map_fn(lambda b: preprocess_for_eval(b, image_size), image_bytes,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def build_serving_module(model, image_size: int, class_names: List[str]):
    """A tf.Module holding the model and the two serving functions."""
    import tensorflow as tf

    from hrnet.compat import tf_variable

    k = min(TOP_K, len(class_names))

    class Serving(tf.Module):
        def __init__(self):
            super().__init__(name="hrnet_serving")
            self.model = model
            # Tracked explicitly: Keras 3 wraps its tf.Variables, and a SavedModel must hold them.
            self.model_variables = [tf_variable(v) for v in model.variables]
            self.class_names = tf.constant(class_names)

        @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
        def serve_images(self, images):
            logits = tf.cast(self.model(images, training=False), tf.float32)
            return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def classify_bytes(self, image_bytes):
            images = decode_batch(image_bytes, image_size)
            probabilities = tf.nn.softmax(tf.cast(self.model(images, training=False), tf.float32))
            top = tf.math.top_k(probabilities, k=k)
            return {"classes": top.indices, "names": tf.gather(self.class_names, top.indices),
                    "probabilities": top.values}

    return Serving()


def _freeze(model, image_size: int, batch_size: int, out_dir: str) -> Dict[str, Any]:
    """The frozen inference graph (.pb) with its node names; returns its description."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda images: tf.cast(model(images, training=False), tf.float32))
    concrete = fn.get_concrete_function(tf.TensorSpec([batch_size, image_size, image_size, 3], tf.float32,
                                                      name="images"))
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    os.makedirs(out_dir, exist_ok=True)
    tf.io.write_graph(graph_def, out_dir, FROZEN_NAME, as_text=False)
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    return {"graph": FROZEN_NAME, "inputs": inputs, "outputs": outputs, "nodes": len(graph_def.node),
            "input_shape": [batch_size, image_size, image_size, 3]}


def atc_command(frozen: Dict[str, Any], output: str, soc_version: str) -> str:
    """The ATC command that converts the frozen graph to an Ascend offline model (.om)."""
    in_node = frozen["inputs"][0].split(":")[0]
    shape = ",".join(str(d) for d in frozen["input_shape"])
    return ("atc --model=%s --framework=3 --output=%s --soc_version=%s --input_format=NHWC "
            '--input_shape="%s:%s" --out_nodes="%s"'
            % (frozen["graph"], output, soc_version, in_node, shape, ";".join(frozen["outputs"])))


def _onnx(model, image_size: int, path: str) -> Dict[str, Any]:
    """model.onnx through tf2onnx when it is installed; otherwise the reason it was skipped."""
    try:
        import tf2onnx
    except ImportError:
        return {"skipped": "tf2onnx is not installed (pip install 'hrnet[onnx]')"}
    import tensorflow as tf

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # one INFO line per folded node otherwise
    fn = tf.function(lambda images: {"logits": tf.cast(model(images, training=False), tf.float32)})
    spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")]
    try:
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET, output_path=path)
    except Exception as e:  # tf2onnx fails in many ways on new TF versions; the other formats still stand
        log.warning("ONNX export failed: %s", e)
        return {"skipped": "tf2onnx failed: %s" % str(e).splitlines()[0][:300]}
    return {"path": os.path.basename(path), "opset": ONNX_OPSET, "inputs": ["images"], "outputs": ["logits"]}


def _is_version(text: str) -> bool:
    """A SavedModel version: a positive integer, or "step" (the exported weights' training step)."""
    return text == "step" or (text.isdigit() and int(text) >= 1)


def parse_version(text: str) -> str:
    import argparse

    if _is_version(text):
        return text
    raise argparse.ArgumentTypeError("must be a positive integer or 'step', not %r" % text)


def export_model(checkpoint: str, out: str, atc_batch_size: int = 1, soc_version: str = "Ascend910",
                 onnx: bool = True, force: bool = False, weights: str = "best",
                 version: str = str(DEFAULT_VERSION)) -> Dict[str, Any]:
    """Export the checkpoint at ``checkpoint`` into ``out``; returns the manifest.
    ``weights``: the run's "best" (by validation top-1, when it validated) or "last";
    ``version``: the SavedModel's folder, a positive integer or "step"."""
    from hrnet.manifest import file_entry, write_manifest
    from hrnet.run_folder import load_checkpoint_model, pick_weights, read_model_manifest

    if atc_batch_size < 1:
        raise ValueError("atc_batch_size must be >= 1, got %r" % atc_batch_size)
    if not _is_version(str(version)):
        raise ValueError("version must be a positive integer or 'step', got %r" % version)
    # Every refusal that needs no TensorFlow comes before it loads (seconds, not a moment).
    ckpt_dir = storage.local_input(checkpoint)
    pick_weights(read_model_manifest(ckpt_dir), weights)
    if not force:
        storage.claim_output(out, "export", mark=False)

    from hrnet.compat import set_mixed_precision

    set_mixed_precision("float32")  # serve in float32 whatever the training precision was
    model, ckpt, picked = load_checkpoint_model(ckpt_dir, which=weights)
    size = ckpt["image_size"]
    names = _class_names(ckpt_dir, ckpt["num_classes"])
    version = str(max(1, int(picked["step"] or 0)) if version == "step" else int(version))
    with storage.local_output(out, kind="export", force=force) as out_dir:
        _write_saved_model(model, size, names, out_dir, version)
        frozen = _write_frozen(model, ckpt["model"], size, atc_batch_size, soc_version, os.path.join(out_dir, "frozen"))

        onnx_info = _onnx(model, size, os.path.join(out_dir, "model.onnx")) if onnx else {"skipped": "not asked for"}
        files = []
        for root, _, fnames in os.walk(out_dir):
            for fname in sorted(fnames):
                if fname != "manifest.json":
                    files.append(file_entry(os.path.join(root, fname), out_dir))
        manifest = {
            "kind": "export",
            "checkpoint": checkpoint,
            "model": ckpt["model"],
            "num_classes": ckpt["num_classes"],
            "image_size": size,
            "class_names": names,  # for a runtime other than the SavedModel's classify_bytes (ONNX)
            "weights": picked["which"],
            "step": picked["step"],
            "saved_model": {
                "path": version,
                "version": int(version),
                "signatures": {
                    "serving_default": {"inputs": {"images": [None, size, size, 3]},
                                        "outputs": ["logits", "probabilities"]},
                    "classify_bytes": {"inputs": {"image_bytes": [None]},
                                       "outputs": ["classes", "names", "probabilities"]},
                },
            },
            "frozen": dict(frozen, path="frozen/" + FROZEN_NAME),
            "files": sorted(files, key=lambda e: e["path"]),
        }
        if "path" in onnx_info:
            manifest["onnx"] = onnx_info
        else:
            manifest["onnx_skipped"] = onnx_info["skipped"]
        write_manifest(out_dir, manifest)
    return manifest


def _write_saved_model(model, size: int, names, out_dir: str, version: str) -> None:
    """The SavedModel with its two serving signatures in ``out_dir/version``. An export holds
    one version: a re-run replaces the earlier (possibly partial) one, whatever its number,
    and nothing else in the folder (the output's lease lets only export write there)."""
    import tensorflow as tf

    for name in os.listdir(out_dir):
        if name.isdigit() and os.path.isdir(os.path.join(out_dir, name)):
            shutil.rmtree(os.path.join(out_dir, name))
    saved_dir = os.path.join(out_dir, version)
    module = build_serving_module(model, size, names)
    tf.saved_model.save(module, saved_dir, signatures={
        "serving_default": module.serve_images.get_concrete_function(),
        "classify_bytes": module.classify_bytes.get_concrete_function(),
    })
    log.info("SavedModel written to %s", saved_dir)


def _write_frozen(model, model_name: str, size: int, atc_batch_size: int, soc_version: str,
                  frozen_dir: str) -> Dict[str, Any]:
    """The frozen graph for Ascend's ATC, what it takes and gives (nodes.json) and the atc
    command that makes the offline model (atc.sh); returns what nodes.json holds."""
    frozen = _freeze(model, size, atc_batch_size, frozen_dir)
    om_name = "hrnet_%s" % model_name.replace("/", "_").replace(".yaml", "")
    frozen["atc"] = atc_command(frozen, om_name, soc_version)
    frozen["preprocessing"] = "RGB NHWC float32, (x / 255 - mean) / std, mean %s std %s" % (
        list(_mean_std()[0]), list(_mean_std()[1]))
    with open(os.path.join(frozen_dir, "nodes.json"), "w") as f:
        json.dump(frozen, f, indent=2)
        f.write("\n")
    with open(os.path.join(frozen_dir, "atc.sh"), "w") as f:
        f.write("#!/bin/sh\n# Ascend offline model from the frozen graph (run where CANN's atc is installed).\n")
        f.write('cd "$(dirname "$0")"\n' + frozen["atc"] + "\n")
    log.info("frozen graph %s: inputs %s, outputs %s", os.path.join(frozen_dir, FROZEN_NAME), frozen["inputs"],
             frozen["outputs"])
    return frozen


def _mean_std():
    from hrnet.data import MEAN_RGB, STDDEV_RGB

    return MEAN_RGB, STDDEV_RGB


def add_arguments(parser) -> None:
    from hrnet.evaluate import add_weights_argument

    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (output of `hrnet train`)")
    parser.add_argument("--out", required=True, help="folder or URI for the exported model")
    parser.add_argument("--atc-batch-size", type=int, default=1, help="fixed batch size of the frozen graph (ATC)")
    parser.add_argument("--soc-version", default="Ascend910", help="ATC --soc_version (Ascend910, Ascend310, ...)")
    parser.add_argument("--version", type=parse_version, default=str(DEFAULT_VERSION),
                        help="the SavedModel's version folder (TF Serving / KServe): a positive integer, or 'step' "
                             "for the weights' training step (default: %(default)s)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX export")
    add_weights_argument(parser)
    storage.add_force_argument(parser)


def run(args) -> int:
    m = export_model(args.checkpoint, args.out, atc_batch_size=args.atc_batch_size, soc_version=args.soc_version,
                     onnx=args.onnx, force=args.force, weights=args.weights, version=args.version)
    formats = ["saved_model " + m["saved_model"]["path"] + "/", "frozen"] + (["onnx"] if "onnx" in m else [])
    print("exported %s (%s weights, step %s; %d classes, %dx%d) to %s: %s%s" % (
        m["model"], m["weights"], m["step"], m["num_classes"], m["image_size"], m["image_size"], args.out,
        ", ".join(formats), "" if "onnx" in m else " (onnx: %s)" % m["onnx_skipped"]))
    print("atc: " + m["frozen"]["atc"])
    return 0

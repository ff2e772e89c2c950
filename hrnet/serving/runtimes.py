"""The runtimes an export's network can run on, and the choice between them.

- ``savedmodel``: TensorFlow on the export's SavedModel (``serving_default``); always there.
- ``onnxruntime``: ONNX Runtime on the export's ``model.onnx``, when the export has one and
  the ``onnxruntime`` package is installed.

``auto`` (the default of ``hrnet predict`` and ``hrnet serve``) runs both on the same probe
images when it can and keeps the faster, but only where ONNX's logits agree with the
SavedModel's (the same top-1 on every probe, and within ``AGREEMENT`` of each other);
otherwise the SavedModel. Which is faster depends on the machine (see
benchmarks/inference_runtimes.py), so it is measured where the model is served, not fixed
here. Decoding and cropping images stay in TensorFlow either way: they are the evaluation's
own ops, and ONNX has no JPEG decoder.
"""
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from hrnet.errors import HrnetError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "savedmodel", "onnxruntime")
AGREEMENT = 1e-3  # max |logit difference| relative to the largest |logit|: fp32 reordering, not a wrong graph
PROBE_BATCH = 4
PROBE_CALLS = 3


@dataclass(frozen=True)
class Choice:
    name: str  # one of RUNTIMES but auto
    reason: str  # said in the log of predict and serve


def onnx_logits(path: str) -> Callable:
    """images (float32 numpy [N, H, W, 3]) -> logits (numpy [N, classes]) under ONNX Runtime."""
    try:
        import onnxruntime
    except ImportError:
        raise HrnetError("runtime onnxruntime needs the onnxruntime package: pip install 'hrnet[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # its warnings name graph nodes, not anything a user can act on
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]

    def logits(images):
        return session.run(["logits"], {name: images})[0]

    return logits


def _best_seconds(fn: Callable, images) -> float:
    fn(images)  # warm-up: first-call allocation and graph set-up
    best = float("inf")
    for _ in range(PROBE_CALLS):
        began = time.perf_counter()
        fn(images)
        best = min(best, time.perf_counter() - began)
    return best


def choose(wanted: str, export_dir: str, manifest: dict, savedmodel: Callable) -> Tuple[Choice, Optional[Callable]]:
    """(the runtime to use and why, ONNX's logits function when it is the one)."""
    import numpy as np

    if wanted not in RUNTIMES:
        raise HrnetError("runtime must be one of %s, got %r" % (", ".join(RUNTIMES), wanted))
    if wanted == "savedmodel":
        return Choice("savedmodel", "asked for"), None
    onnx = manifest.get("onnx")
    missing = None
    if not onnx:
        missing = "the export has no model.onnx (%s)" % manifest.get("onnx_skipped", "exported without it")
    elif "class_names" not in manifest:
        missing = "the export predates class names in its manifest; export it again"
    if missing:
        if wanted == "onnxruntime":
            raise HrnetError("runtime onnxruntime: %s" % missing)
        return Choice("savedmodel", missing), None
    if wanted == "auto":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return Choice("savedmodel", "onnxruntime is not installed"), None
    run_onnx = onnx_logits(os.path.join(export_dir, onnx["path"]))
    if wanted == "onnxruntime":
        return Choice("onnxruntime", "asked for"), run_onnx

    size = int(manifest["image_size"])
    probe = np.random.default_rng(0).standard_normal((PROBE_BATCH, size, size, 3)).astype(np.float32)
    ours, theirs = savedmodel(probe), run_onnx(probe)
    scale = max(1.0, float(np.abs(ours).max()))
    difference = float(np.abs(ours - theirs).max()) / scale
    if difference > AGREEMENT or (ours.argmax(-1) != theirs.argmax(-1)).any():
        log.warning("model.onnx disagrees with the SavedModel (relative logit difference %.2g); using the SavedModel",
                    difference)
        return Choice("savedmodel", "ONNX's logits differ from the SavedModel's by %.2g" % difference), None
    times = {"savedmodel": _best_seconds(savedmodel, probe), "onnxruntime": _best_seconds(run_onnx, probe)}
    name = min(times, key=times.get)
    other = "onnxruntime" if name == "savedmodel" else "savedmodel"
    reason = "faster here: %.1f ms against %s's %.1f ms per batch of %d; logits agree to %.1g" % (
        1000 * times[name], other, 1000 * times[other], PROBE_BATCH, difference)
    return Choice(name, reason), (run_onnx if name == "onnxruntime" else None)

"""Portable weight files, and import of official / timm PyTorch checkpoints.

A weight file is a plain TF checkpoint (``PREFIX.index`` + ``PREFIX.data-*``) whose keys
are ``<layer name>/<weight name>`` (``stage2_0_fuse_layers_0_1_0/kernel``). It does not
depend on how Keras tracks objects, so a file written under Keras 2 (the Ascend image's
TF 2.6) loads under Keras 3 and back, and ``tf.train.load_checkpoint`` reads it anywhere.

PyTorch import: our layer names are the official ``state_dict`` module paths with '.'
replaced by '_', so each tensor has exactly one home. Conv weights go OIHW -> HWIO,
linear weights are transposed, BN weight/bias/running_mean/running_var become
gamma/beta/moving_mean/moving_variance. torch is imported only here.
"""
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from hrnet.compat import keras, tf_variable, weight_name
from hrnet.errors import HrnetError

log = logging.getLogger(__name__)

CLASSIFIER = "classifier"


class WeightsMismatchError(HrnetError):
    """A weight file or PyTorch checkpoint that does not fit the model."""


def model_weights(model) -> List[Tuple[str, object]]:
    """(key, variable) of every weight, trainable or not, in layer order."""
    out = []
    for layer in model.layers:
        for w in layer.weights:
            out.append(("%s/%s" % (layer.name, weight_name(w)), w))
    return out


def save_weights(model, prefix: str) -> str:
    """Write all weights of ``model`` to the TF checkpoint ``prefix``; returns prefix."""
    parent = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(parent, exist_ok=True)
    items = model_weights(model)
    # Written under a temporary prefix and renamed, so a crash never leaves a half file
    # under the real name (readers check PREFIX.index).
    tmp = prefix + ".tmp"
    tf.raw_ops.SaveV2(
        prefix=tmp,
        tensor_names=[k for k, _ in items],
        shape_and_slices=[""] * len(items),
        tensors=[tf.convert_to_tensor(tf_variable(w)) for _, w in items],
    )
    data = [f for f in os.listdir(parent) if f.startswith(os.path.basename(tmp) + ".data-")]
    for f in data:
        os.replace(os.path.join(parent, f), os.path.join(parent, f.replace(".tmp.data-", ".data-", 1)))
    os.replace(tmp + ".index", prefix + ".index")
    return prefix


def read_weights(prefix: str) -> Dict[str, np.ndarray]:
    """All tensors of a weight file as numpy arrays."""
    if not os.path.exists(prefix + ".index"):
        raise FileNotFoundError("no weight file %s.index" % prefix)
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def assign_weights(model, values: Dict[str, np.ndarray], skip_classifier: bool = False, source: str = "") -> int:
    """Assign ``values`` (key -> array) to the model's weights; every model weight must be
    present with its shape and every value used. Returns the number assigned."""
    items = model_weights(model)
    keys = {k for k, _ in items}
    src = " in " + source if source else ""
    for key in sorted(values):
        if key not in keys and not (skip_classifier and key.startswith(CLASSIFIER + "/")):
            raise WeightsMismatchError("unexpected key %r%s: the model has no such weight" % (key, src))
    assigned = 0
    for key, var in items:
        if skip_classifier and key.startswith(CLASSIFIER + "/"):
            continue
        if key not in values:
            raise WeightsMismatchError("missing key %r%s" % (key, src))
        value = values[key]
        if tuple(value.shape) != tuple(var.shape):
            raise WeightsMismatchError(
                "shape mismatch for %r%s: file has %s, model needs %s"
                % (key, src, tuple(value.shape), tuple(var.shape))
            )
        var.assign(value.astype(var.dtype.name if hasattr(var.dtype, "name") else var.dtype))
        assigned += 1
    return assigned


def load_weights(model, prefix: str, skip_classifier: bool = False) -> int:
    """Load a weight file into ``model``. skip_classifier keeps the model's own
    (freshly initialized) classifier, for fine-tuning on other classes."""
    return assign_weights(model, read_weights(prefix), skip_classifier, source=prefix)


# --- PyTorch (official HRNet-Image-Classification / timm) -------------------------------

_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """The tensors of a PyTorch checkpoint file as numpy arrays. Accepts a bare state_dict
    or one wrapped as {'state_dict': ...} / {'model': ...}, with or without the 'module.'
    prefix of DataParallel."""
    try:
        import torch
    except ImportError as e:
        raise HrnetError("importing PyTorch checkpoints needs torch: pip install 'hrnet[torch]'") from e
    if not os.path.exists(path):
        raise FileNotFoundError("no such checkpoint: %s" % path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is no checkpoint
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message for terminals
        if "Unsupported global" in text:
            # A pickled whole model (torch.save(model)): unpickling it would run its code.
            raise HrnetError("%s holds a pickled model object, not a state_dict; save the weights alone with "
                             "torch.save(model.state_dict(), path) and import that file" % path) from None
        # torch's own detail follows its advice on weights_only (which does not apply here).
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
        first = detail.splitlines()[0] if detail else type(e).__name__
        raise HrnetError("%s is not a readable PyTorch checkpoint: %s" % (path, first[:200])) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise HrnetError("%s holds a %s, not a state_dict" % (path, type(obj).__name__))
    out = {}
    for key, tensor in obj.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("num_batches_tracked"):
            continue
        out[key] = tensor.detach().cpu().float().numpy()
    return out


def torch_to_keras(state: Dict[str, np.ndarray], model) -> Dict[str, np.ndarray]:
    """Rename and re-layout PyTorch tensors to the model's weight keys."""
    # By base class: the model's BatchNormalization is a subclass of Keras' under Keras 3.
    bases = (keras.layers.BatchNormalization, keras.layers.Conv2D, keras.layers.Dense)
    kinds = {layer.name: next((b.__name__ for b in bases if isinstance(layer, b)), type(layer).__name__)
             for layer in model.layers}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        layer = module.replace(".", "_")
        kind = kinds.get(layer)
        if kind is None:
            raise WeightsMismatchError("unexpected key %r in the PyTorch checkpoint: no layer %r" % (key, layer))
        if kind == "BatchNormalization":
            name = _BN.get(param)
        elif kind == "Conv2D" and param in ("weight", "bias"):
            name = "kernel" if param == "weight" else "bias"
            if param == "weight":
                if value.ndim != 4:
                    raise WeightsMismatchError("%r is not a conv weight (shape %s)" % (key, value.shape))
                value = value.transpose(2, 3, 1, 0)
        elif kind == "Dense" and param in ("weight", "bias"):
            name = "kernel" if param == "weight" else "bias"
            if param == "weight":
                value = value.T
        else:
            name = None
        if name is None:
            raise WeightsMismatchError("unexpected key %r in the PyTorch checkpoint (layer %s)" % (key, kind))
        out["%s/%s" % (layer, name)] = np.ascontiguousarray(value)
    return out


def import_torch(model_name: str, checkpoint: str, output: str, num_classes: Optional[int] = None) -> Dict:
    """Convert an official / timm PyTorch HRNet checkpoint to a weight file at ``output``
    (a folder; the file is ``output/weights``). num_classes other than the checkpoint's
    keeps the backbone and re-initializes the classifier."""
    from hrnet import configs
    from hrnet.manifest import file_entry, write_manifest
    from hrnet.model import build_model, count_params

    name = configs.canonical_name(model_name)
    state = torch_state_dict(checkpoint)
    if "classifier.weight" not in state:
        raise WeightsMismatchError("missing key 'classifier.weight' in %s: not an HRNet classifier" % checkpoint)
    ckpt_classes = int(state["classifier.weight"].shape[0])
    num_classes = num_classes or ckpt_classes
    model = build_model(name, num_classes=num_classes)
    values = torch_to_keras(state, model)
    reinit = num_classes != ckpt_classes
    if reinit:
        values = {k: v for k, v in values.items() if not k.startswith(CLASSIFIER + "/")}
    assigned = assign_weights(model, values, skip_classifier=reinit, source=checkpoint)
    os.makedirs(output, exist_ok=True)
    prefix = save_weights(model, os.path.join(output, "weights"))
    files = [file_entry(os.path.join(output, f), output)
             for f in sorted(os.listdir(output)) if f.startswith("weights.")]
    manifest = {
        "kind": "weights",
        "model": name,
        "num_classes": num_classes,
        "params": count_params(model),
        "source": os.path.basename(checkpoint),
        "classifier": "reinitialized" if reinit else "imported",
        "tensors_imported": assigned,
        "weights": "weights",
        "files": files,
    }
    write_manifest(output, manifest)
    log.info("imported %d tensors from %s into %s (%s, %d classes%s)", assigned, checkpoint, prefix, name,
             num_classes, ", classifier re-initialized" if reinit else "")
    return manifest

"""Parameter and multiply-add counts computed from the built layers."""
from typing import Dict, List

from hrnet.compat import keras


def count_params(model) -> int:
    """Trainable parameters: the official count (BN running statistics are buffers)."""
    return int(sum(int(keras.backend.count_params(w)) for w in model.trainable_weights))


def _macs_by_layer(model) -> Dict[str, int]:
    macs = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            macs[layer.name] = int(h) * int(w) * kh * kw * int(c_in) * int(c_out) // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            macs[layer.name] = int(layer.input.shape[-1]) * int(layer.units)
    return macs


def count_macs(model) -> int:
    """Multiply-adds of convolutions and dense layers for one image of the model's
    (static) input size: the official 'GFLOPs' convention (divide by 1024**3)."""
    if any(d is None for d in model.input.shape[1:3]):
        raise ValueError("count_macs needs a model built with a fixed input_size")
    return sum(_macs_by_layer(model).values())


def summarize(model) -> List[str]:
    """Lines of a short per-stage summary: parameters and GMACs per top-level part."""
    macs = _macs_by_layer(model) if all(d is not None for d in model.input.shape[1:3]) else {}
    parts: Dict[str, List[int]] = {}
    for layer in model.layers:
        part = _part(layer.name)
        entry = parts.setdefault(part, [0, 0])
        entry[0] += sum(int(keras.backend.count_params(w)) for w in layer.trainable_weights)
        entry[1] += macs.get(layer.name, 0)
    lines = ["%-12s %14s %10s" % ("part", "params", "GMACs")]
    for part, (p, m) in parts.items():
        if p or m:
            lines.append("%-12s %14s %10.3f" % (part, f"{p:,}", m / 1024 ** 3))
    return lines


def _part(layer_name: str) -> str:
    head = layer_name.split("_")[0]
    if head in ("conv1", "bn1", "conv2", "bn2", "relu1", "relu2"):
        return "stem"
    if head in ("incre", "downsamp", "final", "head", "avgpool"):
        return "head"
    return head

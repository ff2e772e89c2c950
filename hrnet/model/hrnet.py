"""HRNet for image classification (Wang et al., "Deep High-Resolution Representation
Learning for Visual Recognition", 2019), exactly as the official PyTorch model
(HRNet/HRNet-Image-Classification ``lib/models/cls_hrnet.py``).

Layer names are the official ``state_dict`` module paths with '.' replaced by '_'
(``stage3_2_fuse_layers_2_0_1_0`` is ``stage3.2.fuse_layers.2.0.1.0``), so official and
timm checkpoints map onto the layers one to one (see ``hrnet.weights``).

Two details keep imported weights reproducing the official logits:
- stride-2 3x3 convs pad one pixel on every side as PyTorch does (TF's 'SAME' pads only
  bottom/right on even inputs);
- BatchNorm uses epsilon 1e-5 and momentum 0.9 (PyTorch's momentum 0.1).
"""
import contextvars
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from hrnet import configs
from hrnet.compat import keras
from hrnet.model.batch_norm import BatchNormalization

layers = keras.layers

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
EXPANSION = {"BASIC": 1, "BOTTLENECK": 4}


# A new initializer per layer: Keras 2 (tf-keras) gives an unseeded instance identical
# values on every call, which would start all same-shaped convs with the same kernel.
def conv_init():
    """PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'), the official init."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def dense_init():
    """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


# While fold_batch_norm builds its copy: {conv name: the BN folded into it}, and the last
# conv built under "" (every BN follows its conv directly).
_FOLDING: "contextvars.ContextVar[Optional[Dict[str, str]]]" = contextvars.ContextVar("hrnet_folding", default=None)


def conv(x, filters: int, kernel: int, stride: int, name: str, bias: bool = False):
    """Conv2D with PyTorch's symmetric padding (kernel // 2 on every side)."""
    folding = _FOLDING.get()
    if folding is not None:
        folding[""], bias = name, True
    pad = kernel // 2
    if stride > 1 and pad:
        x = layers.ZeroPadding2D(pad, name=name + "_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return layers.Conv2D(
        filters, kernel, strides=stride, padding=padding, use_bias=bias,
        kernel_initializer=conv_init(), name=name,
    )(x)


def bn(x, name: str):
    folding = _FOLDING.get()
    if folding is not None:
        folding[folding.pop("")] = name
        return x
    return BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)


def relu(x, name: str):
    return layers.ReLU(name=name)(x)


def conv_bn(x, filters: int, kernel: int, stride: int, name: str, act: bool = True, bias: bool = False):
    """The official ``Sequential(conv, BN[, ReLU])``: layers ``name_0`` and ``name_1``."""
    x = conv(x, filters, kernel, stride, name + "_0", bias=bias)
    x = bn(x, name + "_1")
    return relu(x, name + "_relu") if act else x


def basic_block(x, planes: int, stride: int, name: str):
    shortcut = x
    y = relu(bn(conv(x, planes, 3, stride, name + "_conv1"), name + "_bn1"), name + "_relu1")
    y = bn(conv(y, planes, 3, 1, name + "_conv2"), name + "_bn2")
    if stride != 1 or x.shape[-1] != planes:
        shortcut = conv_bn(x, planes, 1, stride, name + "_downsample", act=False)
    return relu(layers.Add(name=name + "_add")([y, shortcut]), name + "_out")


def bottleneck(x, planes: int, stride: int, name: str):
    out_ch = planes * EXPANSION["BOTTLENECK"]
    shortcut = x
    y = relu(bn(conv(x, planes, 1, 1, name + "_conv1"), name + "_bn1"), name + "_relu1")
    y = relu(bn(conv(y, planes, 3, stride, name + "_conv2"), name + "_bn2"), name + "_relu2")
    y = bn(conv(y, out_ch, 1, 1, name + "_conv3"), name + "_bn3")
    if stride != 1 or x.shape[-1] != out_ch:
        shortcut = conv_bn(x, out_ch, 1, stride, name + "_downsample", act=False)
    return relu(layers.Add(name=name + "_add")([y, shortcut]), name + "_out")


BLOCKS = {"BASIC": basic_block, "BOTTLENECK": bottleneck}


def res_layer(x, block: str, planes: int, num_blocks: int, name: str, stride: int = 1):
    """The official ``_make_layer``: blocks ``name_0`` ... ``name_{n-1}``."""
    for k in range(num_blocks):
        x = BLOCKS[block](x, planes, stride if k == 0 else 1, "%s_%d" % (name, k))
    return x


def transition(xs: List, pre_channels: Sequence[int], channels: Sequence[int], name: str):
    """The official ``_make_transition_layer``: adapt existing branches whose width
    changes, and grow each new branch from the lowest-resolution one by stride-2 convs."""
    out = []
    for i, c in enumerate(channels):
        if i < len(pre_channels):
            if c != pre_channels[i]:
                out.append(conv_bn(xs[i], c, 3, 1, "%s_%d" % (name, i)))
            else:
                out.append(xs[i])
        else:
            y = xs[-1]
            steps = i + 1 - len(pre_channels)
            for j in range(steps):
                width = c if j == steps - 1 else pre_channels[-1]
                y = conv_bn(y, width, 3, 2, "%s_%d_%d" % (name, i, j))
            out.append(y)
    return out


def fuse(xs: List, channels: Sequence[int], name: str):
    """Exchange information across resolutions: output branch i sums every branch j,
    upsampled (j > i: 1x1 conv + BN + nearest upsample) or downsampled (j < i: a chain of
    stride-2 3x3 convs), then ReLU."""
    out = []
    for i in range(len(xs)):
        terms = []
        for j in range(len(xs)):
            prefix = "%s_%d_%d" % (name, i, j)
            if j > i:
                y = conv_bn(xs[j], channels[i], 1, 1, prefix, act=False)
                # UpSampling2D scales each axis separately: non-square inputs work.
                y = layers.UpSampling2D(2 ** (j - i), interpolation="nearest", name=prefix + "_up")(y)
            elif j == i:
                y = xs[j]
            else:
                y = xs[j]
                for k in range(i - j):
                    last = k == i - j - 1
                    y = conv_bn(y, channels[i] if last else channels[j], 3, 2, "%s_%d" % (prefix, k), act=not last)
            terms.append(y)
        out.append(relu(layers.Add(name="%s_%d_add" % (name, i))(terms), "%s_%d_relu" % (name, i)))
    return out


def hr_module(xs: List, stage: Dict[str, Any], name: str):
    """One HighResolutionModule: parallel residual branches, then the multi-scale fusion."""
    block, channels = stage["block"], stage["num_channels"]
    xs = [
        res_layer(x, block, c, n, "%s_branches_%d" % (name, b))
        for b, (x, c, n) in enumerate(zip(xs, channels, stage["num_blocks"]))
    ]
    return fuse(xs, [c * EXPANSION[block] for c in channels], name + "_fuse_layers") if len(xs) > 1 else xs


def classification_head(xs: List, head_channels: Sequence[int], final_channels: int):
    """``incre_modules`` (a Bottleneck per branch), ``downsamp_modules`` (stride-2 convs
    with bias, summed from high to low resolution) and ``final_layer`` (1x1 conv with bias)."""
    y = bottleneck(xs[0], head_channels[0], 1, "incre_modules_0_0")
    for i in range(len(xs) - 1):
        width = head_channels[i + 1] * EXPANSION["BOTTLENECK"]
        down = conv_bn(y, width, 3, 2, "downsamp_modules_%d" % i, bias=True)
        incre = bottleneck(xs[i + 1], head_channels[i + 1], 1, "incre_modules_%d_0" % (i + 1))
        y = layers.Add(name="head_add_%d" % i)([incre, down])
    return conv_bn(y, final_channels, 1, 1, "final_layer", bias=True)


def check_input_size(size: Optional[Sequence[Optional[int]]]) -> None:
    """HRNet halves the resolution five times (stem 4x, three more branches 8x)."""
    for s in size or ():
        if s is not None and (int(s) <= 0 or int(s) % 32):
            raise ValueError(
                "HRNet input height and width must be positive multiples of 32, got %s" % (tuple(size),)
            )


def build_model(
    model: Union[str, Dict[str, Any]] = "w18",
    num_classes: int = 1000,
    input_size: Optional[Tuple[Optional[int], Optional[int]]] = None,
    features_only: bool = False,
    name: Optional[str] = None,
):
    """An HRNet classifier as a Keras functional model on NHWC float images.

    model: a config name ('w18', 'w18_small_v1', ... or an alias) or a config dict.
    input_size: (height, width), each a multiple of 32, or None for any size.
    features_only: return the four branch outputs (strides 4, 8, 16, 32) instead of
        logits, to use HRNet as a backbone.
    The classifier (logits) always computes in float32, also under a mixed policy.
    """
    cfg = configs.load(model) if isinstance(model, str) else model
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1, got %d" % num_classes)
    size = tuple(input_size) if input_size else (None, None)
    check_input_size(size)
    inputs = keras.Input(shape=size + (3,), name="images")

    stem = cfg["stem_width"]
    x = relu(bn(conv(inputs, stem, 3, 2, "conv1"), "bn1"), "relu1")
    x = relu(bn(conv(x, stem, 3, 2, "conv2"), "bn2"), "relu2")

    stage1 = cfg["stages"][0]
    x = res_layer(x, stage1["block"], stage1["num_channels"][0], stage1["num_blocks"][0], "layer1")
    xs = [x]
    pre_channels = [stage1["num_channels"][0] * EXPANSION[stage1["block"]]]
    for s, stage in enumerate(cfg["stages"][1:], start=2):
        channels = [c * EXPANSION[stage["block"]] for c in stage["num_channels"]]
        xs = transition(xs, pre_channels, channels, "transition%d" % (s - 1))
        for m in range(stage["num_modules"]):
            xs = hr_module(xs, stage, "stage%d_%d" % (s, m))
        pre_channels = channels

    model_name = name or "hrnet_" + cfg["name"]
    if features_only:
        return keras.Model(inputs, xs, name=model_name + "_features")
    y = classification_head(xs, cfg["head_channels"], cfg["final_channels"])
    y = layers.GlobalAveragePooling2D(name="avgpool")(y)
    logits = layers.Dense(num_classes, kernel_initializer=dense_init(), dtype="float32", name="classifier")(y)
    return keras.Model(inputs, logits, name=model_name)


def fold_batch_norm(model, config: Union[str, Dict[str, Any]], into=None):
    """An inference copy of ``model`` (a classifier built from ``config``) with every
    BatchNormalization folded into the convolution before it: kernel x g / sqrt(v + eps),
    bias (b - m) x g / sqrt(v + eps) + beta. The same logits up to rounding. TF folds
    conv + BN itself only in float32; under mixed_bfloat16, oneDNN runs BN as a separate,
    generic kernel while conv + bias + ReLU fuse: HRNet-W18 inference was 4x faster folded.

    ``into``: a copy an earlier call made of this model, whose weights are folded again
    from the model's current ones instead of building another (validation does so after
    each stretch of training) and returned."""
    folded = into
    if folded is None:
        cfg = configs.load(config) if isinstance(config, str) else config
        pairs: Dict[str, str] = {}
        token = _FOLDING.set(pairs)
        try:
            folded = build_model(cfg, num_classes=model.get_layer("classifier").units,
                                 input_size=tuple(model.input.shape[1:3]), name=model.name)
        finally:
            _FOLDING.reset(token)
        _FOLDED_PAIRS[folded] = pairs
    for conv_name, bn_name in _FOLDED_PAIRS[folded].items():
        source, norm = model.get_layer(conv_name), model.get_layer(bn_name)
        kernel = source.kernel.numpy()
        bias = source.bias.numpy() if source.use_bias else np.zeros(kernel.shape[-1], np.float32)
        gamma, beta, mean, variance = (w.numpy() for w in (norm.gamma, norm.beta, norm.moving_mean,
                                                             norm.moving_variance))
        scale = gamma / np.sqrt(variance + norm.epsilon)
        folded.get_layer(conv_name).set_weights([kernel * scale, (bias - mean) * scale + beta])
    folded.get_layer("classifier").set_weights(model.get_layer("classifier").get_weights())
    return folded


# Each folded copy's {conv name: BN name}, kept beside it rather than as a model attribute,
# which Keras would track as state.
_FOLDED_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

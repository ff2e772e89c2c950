"""The HRNet classification family against the official architecture (REFERENCE.md s.1)."""
import numpy as np
import pytest
import tensorflow as tf

from hrnet import configs
from hrnet.compat import keras
from hrnet.model import build_model, count_macs, count_params

pytestmark = pytest.mark.keras2

# Official models, instantiated: (trainable parameters, 'GFLOPs' = MACs at 224 / 1024^3)
OFFICIAL = {
    "w18_small_v1": (13_187_464, 1.49),
    "w18_small_v2": (15_597_464, 2.42),
    "w18": (21_299_004, 3.99),
    "w30": (37_712_220, 7.55),
    "w32": (41_232_680, 8.31),
    "w40": (57_557_160, 11.8),
    "w44": (67_064_984, 13.9),
    "w48": (77_469_864, 16.1),
    "w64": (128_059_944, 26.9),
}


def test_all_official_configs_present():
    assert sorted(configs.available()) == sorted(OFFICIAL)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_params_and_gmacs(name):
    model = build_model(name, input_size=(224, 224))
    params, gflops = OFFICIAL[name]
    assert count_params(model) == params
    assert count_macs(model) / 1024 ** 3 == pytest.approx(gflops, rel=0.01)


@pytest.mark.parametrize("alias,name", [("w18_s4", "w18"), ("w30_s4", "w30"), ("hrnet_w18_small", "w18_small_v1"),
                                        # timm's names with a pretrained tag
                                        ("hrnet_w18.ms_aug_in1k", "w18"),
                                        ("hrnet_w18_small_v2.ms_in1k", "w18_small_v2")])
def test_aliases(alias, name):
    assert configs.canonical_name(alias) == name
    assert configs.load(alias) == configs.load(name)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown HRNet model 'w18.tagged'"):
        configs.canonical_name("w18.tagged")  # a tag only on a timm name
    with pytest.raises(ValueError, match="unknown HRNet model 'w17'.*w18_small_v1.*w64"):
        build_model("w17")


@pytest.mark.parametrize("size", [(100, 224), (224, 0), (225, 225)])
def test_input_size_must_be_multiple_of_32(size):
    with pytest.raises(ValueError, match="multiples of 32"):
        build_model("w18_small_v1", input_size=size)


def test_official_head_and_bn_details():
    model = build_model("w18_small_v1", num_classes=7)
    layer = model.get_layer
    # Head convs carry a bias, as in the official model; all others do not.
    assert layer("downsamp_modules_0_0").use_bias and layer("final_layer_0").use_bias
    assert not layer("conv1").use_bias and not layer("stage4_0_fuse_layers_0_3_0").use_bias
    bn = layer("bn1")
    assert bn.momentum == pytest.approx(0.9) and bn.epsilon == pytest.approx(1e-5)
    assert model.output.shape[-1] == 7


def test_stride2_conv_pads_symmetrically_like_pytorch():
    # With TF 'SAME' a stride-2 3x3 conv on an even input pads only bottom/right; the
    # official model pads one pixel on each side. A one-hot input at (0, 0) shows which.
    model = build_model("w18_small_v1", input_size=(64, 64))
    conv1 = model.get_layer("conv1")
    x = np.zeros((1, 64, 64, 3), np.float32)
    x[0, 0, 0, 0] = 1.0
    sub = keras.Model(model.input, conv1.output)
    y = sub(x).numpy()
    kernel = conv1.kernel.numpy()
    # Output (0, 0) sees input (0, 0) through kernel tap (1, 1) when padding is symmetric.
    np.testing.assert_allclose(y[0, 0, 0], kernel[1, 1, 0], rtol=1e-5, atol=1e-6)


def test_non_square_input_and_feature_mode():
    features = build_model("w18_small_v1", features_only=True)
    outs = features(tf.zeros((1, 256, 192, 3)))
    assert [tuple(o.shape) for o in outs] == [
        (1, 64, 48, 16), (1, 32, 24, 32), (1, 16, 12, 64), (1, 8, 6, 128),
    ]
    logits = build_model("w18_small_v1", num_classes=10)(tf.zeros((2, 256, 192, 3)))
    assert tuple(logits.shape) == (2, 10)


def test_forward_backward_step():
    model = build_model("w18_small_v1", num_classes=10, input_size=(64, 64))
    x = tf.random.stateless_normal((2, 64, 64, 3), seed=(1, 2))
    y = tf.constant([3, 7])
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    assert all(g is not None for g in grads)
    assert all(bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads)
    assert sum(float(tf.reduce_sum(tf.abs(g))) for g in grads) > 0
    # Training mode updated the BN moving statistics.
    assert not np.allclose(model.get_layer("bn1").moving_mean.numpy(), 0.0)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("channels, width", [(6, 5), (6, 8), (16, 5)])
def test_batch_norm_is_pytorchs_in_training_and_inference(policy, channels, width):
    """The model's BatchNormalization (TF's fused kernel under Keras 3, Keras 2's own layer
    under Keras 2): normalized by the batch's statistics in training, with their gradient;
    the moving averages updated with PyTorch's momentum and the unbiased variance; by the
    moving ones in inference. Against the formulas, in numpy. Under Keras 3 the three
    shapes take the three ways to the kernel: 6 channels on a width of 8 the channel-grouped
    view (bf16, and float32 training), on a width of 5 float32 between casts (bf16), 16 the
    input as it is."""
    from hrnet import compat
    from hrnet.compat import set_mixed_precision
    from hrnet.model import batch_norm
    from hrnet.model.batch_norm import BatchNormalization
    from hrnet.model.hrnet import BN_EPSILON, BN_MOMENTUM

    rng = np.random.RandomState(0)
    x = (rng.randn(4, 5, width, channels) * 3 + 1).astype(np.float32)
    dy = rng.randn(*x.shape).astype(np.float32)
    gamma, beta, mean0, var0 = (rng.rand(channels).astype(np.float32) + 0.5 for _ in range(4))
    set_mixed_precision(policy)
    try:
        layer = BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        layer.build(x.shape)
        layer.set_weights([gamma, beta, mean0, var0])
        inputs = tf.cast(tf.constant(x), layer.compute_dtype)  # as the layer before hands it on
        if compat.KERAS3:
            assert batch_norm._on_view(inputs, True) == (width == 8)
        inference = layer(inputs, training=False)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            training = layer(inputs, training=True)
            loss = tf.reduce_sum(tf.cast(training, tf.float32) * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
    finally:
        set_mixed_precision("float32")
    # Under the mixed policy x, and dy on its way back, are rounded to bfloat16.
    x = inputs.numpy().astype(np.float64)
    dy = tf.cast(tf.cast(dy, training.dtype), tf.float64).numpy()
    tol = dict(rtol=1e-5, atol=1e-5) if policy == "float32" else dict(rtol=2e-2, atol=5e-2)
    assert inference.dtype == training.dtype == (tf.float32 if policy == "float32" else tf.bfloat16)
    np.testing.assert_allclose(inference.numpy().astype(np.float32),
                               gamma * (x - mean0) / np.sqrt(var0 + BN_EPSILON) + beta, **tol)
    axes, n = (0, 1, 2), x.size // channels
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    rstd = 1 / np.sqrt(var + BN_EPSILON)
    x_hat = (x - mean) * rstd
    np.testing.assert_allclose(training.numpy().astype(np.float32), gamma * x_hat + beta, **tol)
    np.testing.assert_allclose(dbeta.numpy(), dy.sum(axis=axes), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dgamma.numpy(), (dy * x_hat).sum(axis=axes), rtol=1e-4, atol=1e-3)
    expected_dx = gamma * rstd * (dy - dy.mean(axis=axes) - x_hat * (dy * x_hat).mean(axis=axes))
    np.testing.assert_allclose(dx.numpy().astype(np.float32), expected_dx, **tol)
    stats = dict(rtol=1e-5) if policy == "float32" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_mean.numpy(), BN_MOMENTUM * mean0 + (1 - BN_MOMENTUM) * mean, **stats)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               BN_MOMENTUM * var0 + (1 - BN_MOMENTUM) * var * n / (n - 1), **stats)


def test_folding_batch_norm_into_the_convs_keeps_the_logits():
    from hrnet.compat import set_mixed_precision
    from hrnet.model import fold_batch_norm

    model = build_model("w18_small_v1", num_classes=9, input_size=(64, 64))
    rng = np.random.RandomState(1)
    for layer in model.layers:  # statistics far from the initial 0 / 1, so that folding shows
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.rand(c) + 0.5, rng.randn(c) * 0.1, rng.randn(c) * 0.1, rng.rand(c) + 0.5])
    images = tf.constant(rng.rand(2, 64, 64, 3).astype(np.float32))
    expected = model(images, training=False).numpy()
    folded = fold_batch_norm(model, "w18_small_v1")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert all(layer.use_bias for layer in folded.layers if isinstance(layer, keras.layers.Conv2D))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(folded(images).numpy(), expected, atol=1e-4 * scale)
    set_mixed_precision("mixed_bfloat16")
    try:
        low = fold_batch_norm(model, "w18_small_v1")(images).numpy()
    finally:
        set_mixed_precision("float32")
    assert low.dtype == np.float32 and np.abs(low - expected).max() < 0.1 * scale


def test_logits_stay_float32_under_mixed_precision():
    from hrnet.compat import set_mixed_precision

    set_mixed_precision("mixed_bfloat16")
    try:
        model = build_model("w18_small_v1", num_classes=5)
        out = model(tf.zeros((1, 64, 64, 3)))
        assert model.get_layer("conv1").compute_dtype == "bfloat16"
        assert out.dtype == tf.float32
    finally:
        set_mixed_precision("float32")


def test_same_shaped_convs_start_different():
    # Keras 2 repeats an unseeded initializer's values: each layer needs its own.
    model = build_model("w18_small_v1")
    a = model.get_layer("stage2_0_branches_0_0_conv1").kernel.numpy()
    b = model.get_layer("stage2_0_branches_0_0_conv2").kernel.numpy()
    assert a.shape == b.shape and not np.allclose(a, b)

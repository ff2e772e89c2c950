"""Portable weight files, and import of official / timm PyTorch checkpoints."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from hrnet.cli import main as hrnet_main
from hrnet.model import build_model
from hrnet.weights import WeightsMismatchError, load_weights, read_weights, save_weights


def _randomize(model, seed=0):
    rng = np.random.RandomState(seed)
    for w in model.weights:
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))


@pytest.mark.keras2
def test_save_load_roundtrip(tmp_path):
    src = build_model("w18_small_v1", num_classes=10)
    _randomize(src)
    prefix = save_weights(src, str(tmp_path / "w" / "weights"))
    assert os.path.exists(prefix + ".index") and not any(".tmp" in f for f in os.listdir(tmp_path / "w"))
    dst = build_model("w18_small_v1", num_classes=10)
    load_weights(dst, prefix)
    for a, b in zip(src.weights, dst.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Keys are layer/weight names, readable without Keras.
    assert "stage2_0_fuse_layers_0_1_0/kernel" in read_weights(prefix)
    assert "bn1/moving_variance" in read_weights(prefix)


@pytest.mark.keras2
def test_load_errors_name_the_offending_key(tmp_path):
    prefix = save_weights(build_model("w18_small_v1", num_classes=10), str(tmp_path / "weights"))
    with pytest.raises(WeightsMismatchError, match="shape mismatch for 'classifier/kernel'"):
        load_weights(build_model("w18_small_v1", num_classes=5), prefix)
    # skip_classifier keeps the model's own classifier (fine-tuning on other classes).
    load_weights(build_model("w18_small_v1", num_classes=5), prefix, skip_classifier=True)
    with pytest.raises(WeightsMismatchError, match="shape mismatch for .layer1_0_conv1/kernel"):
        load_weights(build_model("w18_small_v2", num_classes=10), prefix)


def test_weights_cross_keras_versions(tmp_path):
    """A file written under Keras 3 loads under legacy Keras 2 (the Ascend image's API)."""
    model = build_model("w18_small_v1", num_classes=10)
    _randomize(model, seed=3)
    x = np.random.RandomState(1).rand(1, 64, 64, 3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", model(x, training=False).numpy())
    save_weights(model, str(tmp_path / "weights"))
    script = (
        "import numpy as np, sys; from hrnet.compat import KERAS3; assert not KERAS3;"
        "from hrnet.model import build_model; from hrnet.weights import load_weights;"
        "d=sys.argv[1]; m=build_model('w18_small_v1', num_classes=10); load_weights(m, d+'/weights');"
        "out=m(np.load(d+'/x.npy'), training=False).numpy();"
        "np.testing.assert_allclose(out, np.load(d+'/ref.npy'), rtol=1e-4, atol=1e-4); print('ok')"
    )
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# --- PyTorch import (timm builds the official architecture) -----------------------------



# timm (through torchvision) crashes when imported after TensorFlow in one process, so the
# PyTorch side runs in a child process that never imports TensorFlow.
_TIMM_REFERENCE = """
import sys, numpy as np, torch, timm
name, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(seed)
model = timm.create_model(name, pretrained=False).eval()
# BN statistics that matter: measured on random images (so activations keep a sane
# scale through the deep net and logits stay near 1), then perturbed, with random affine terms.
bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
for m in bns:
    m.reset_running_stats()
    m.momentum = None
model.train()
with torch.no_grad():
    model(torch.randn(4, 3, 224, 224))
model.eval()
for m in bns:
    m.running_mean.mul_(torch.empty_like(m.running_mean).uniform_(0.8, 1.2))
    m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.2))
    m.weight.data.uniform_(0.8, 1.2)
    m.bias.data.uniform_(-0.1, 0.1)
torch.save({"state_dict": model.state_dict()}, out + "/model.pth")
for h, w in [(224, 224), (256, 192)]:
    x = np.random.RandomState(w).randn(2, 3, h, w).astype(np.float32)
    with torch.no_grad():
        np.save(out + "/logits_%dx%d.npy" % (h, w), model(torch.from_numpy(x)).numpy())
    np.save(out + "/x_%dx%d.npy" % (h, w), x)
"""


def _timm_reference(name, seed, out):
    r = subprocess.run([sys.executable, "-c", _TIMM_REFERENCE, name, str(seed), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "model.pth"


@pytest.mark.torch
@pytest.mark.parametrize("timm_name,ours", [
    pytest.param("hrnet_w18_small", "w18_small_v1", marks=pytest.mark.keras2),  # import under Keras 2 too
    ("hrnet_w18", "w18")])
def test_import_timm_checkpoint_reproduces_logits(tmp_path, timm_name, ours):
    pth = _timm_reference(timm_name, 0, tmp_path)
    out = tmp_path / "tf"
    assert hrnet_main(["import-weights", "--model", ours, "--torch-checkpoint", str(pth), "--output", str(out)]) == 0

    model = build_model(ours)
    load_weights(model, str(out / "weights"))
    for size in [(224, 224), (256, 192)]:
        x = np.load(tmp_path / ("x_%dx%d.npy" % size))
        ref = np.load(tmp_path / ("logits_%dx%d.npy" % size))
        got = model(tf.constant(x.transpose(0, 2, 3, 1)), training=False).numpy()
        assert np.abs(ref).max() > 0.1  # logits of a useful scale, not all ~0
        assert np.abs(got - ref).max() < 1e-4, size


@pytest.mark.torch
def test_import_with_new_classes_and_bad_checkpoints(tmp_path, capsys):
    import torch

    pth = _timm_reference("hrnet_w18_small", 1, tmp_path)
    state = torch.load(pth, weights_only=True)["state_dict"]
    out = tmp_path / "k5"
    assert hrnet_main(["import-weights", "--model", "w18_small_v1", "--torch-checkpoint", str(pth),
                       "--output", str(out), "--num-classes", "5"]) == 0
    model = build_model("w18_small_v1", num_classes=5)
    load_weights(model, str(out / "weights"))
    np.testing.assert_allclose(model.get_layer("conv1").kernel.numpy(),
                               state["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    assert model.get_layer("classifier").kernel.shape == (2048, 5)

    # Wrong shape, wrong architecture, missing key, not a checkpoint: one line naming it.
    bad = dict(state)
    bad["layer1.0.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save(bad, tmp_path / "bad_shape.pth")
    missing = {k: v for k, v in state.items() if k != "stage3.0.branches.1.1.bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")  # torch.save(model), not its state_dict
    cases = [
        ("bad_shape.pth", "w18_small_v1", "shape mismatch for 'layer1_0_conv2/kernel'"),
        ("model.pth", "w18", "unexpected key|shape mismatch|missing key"),
        ("missing.pth", "w18_small_v1", "missing key 'stage3_0_branches_1_1_bn2/moving_variance'"),
        ("junk.pth", "w18_small_v1", "not a readable PyTorch checkpoint"),
        ("whole.pth", "w18_small_v1", r"holds a pickled model object, not a state_dict; save the weights alone "
                                      r"with torch.save\(model.state_dict\(\), path\)"),
    ]
    for name, model_name, message in cases:
        code = hrnet_main(["import-weights", "--model", model_name, "--torch-checkpoint",
                           str(tmp_path / name), "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and re.search(message, err), (name, err)
        assert "Traceback" not in err and "\x1b" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.torch
def test_init_from_takes_a_pytorch_checkpoint_and_uris(tmp_path, s3_env):
    """Fine-tuning starts from an official-style .pth (imported on the fly, here from a
    bucket) or from import-weights output in a bucket; a 5-class head is new."""
    import torch

    from hrnet import storage
    from hrnet.train.start import init_from

    pth = _timm_reference("hrnet_w18_small", 2, tmp_path)
    state = torch.load(pth, weights_only=True)["state_dict"]
    # As the official training script saves: wrapped, with DataParallel's module. prefix.
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 99, "optimizer": {}},
               tmp_path / "official.pth")
    storage.write_bytes(s3_env.uri("models/official.pth"), (tmp_path / "official.pth").read_bytes())
    conv1 = state["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    for source in (str(tmp_path / "official.pth"), s3_env.uri("models/official.pth")):
        model = build_model("w18_small_v1", num_classes=5)
        init_from(model, source, 5)
        np.testing.assert_allclose(model.get_layer("conv1").kernel.numpy(), conv1)
        assert model.get_layer("classifier").kernel.shape == (2048, 5)
    assert hrnet_main(["import-weights", "--model", "hrnet_w18_small", "--torch-checkpoint", str(pth),
                       "--output", str(tmp_path / "imported")]) == 0
    storage.upload(str(tmp_path / "imported"), s3_env.uri("models/imported"))
    model = build_model("w18_small_v1", num_classes=1000)
    init_from(model, s3_env.uri("models/imported"), 1000)
    np.testing.assert_allclose(model.get_layer("classifier").kernel.numpy(),
                               state["classifier.weight"].numpy().T)

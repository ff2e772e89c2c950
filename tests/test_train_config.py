"""TrainConfig resolution, CLI/YAML round trips and the lr schedules (no model, no data)."""
import argparse
import math

import pytest

from hrnet.errors import HrnetError
from hrnet.train import schedules
from hrnet.train.config import TrainConfig, add_arguments, check_resumable, from_args, load_saved


def resolved(**kw):
    base = dict(data="d", out="o")
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_official_recipe_by_default_scaled_to_the_global_batch():
    cfg = resolved(batch_size=32).resolve(num_classes=1000, label_offset=1, train_count=1281167, num_replicas=8)
    assert cfg.global_batch_size == 256
    assert cfg.lr == pytest.approx(0.1)  # 0.1 per 256 images
    assert cfg.epochs == 100 and cfg.train_steps == round(100 * 1281167 / 256)
    assert cfg.lr_decay_epochs == [30, 60, 90]
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.9, True, 1e-4)
    assert cfg.precision == "fp32" and cfg.num_classes == 1000 and cfg.label_offset == 1
    # The seed: one device, batch 32 -> lr 0.0125; 40036 steps for one epoch of ImageNet.
    seed = resolved(batch_size=32, epochs=1).resolve(1000, 1, 1281167, 1)
    assert seed.lr == pytest.approx(0.0125) and seed.train_steps == 40036


def test_short_runs_scale_the_decay_epochs_and_train_steps_wins():
    cfg = resolved(epochs=10).resolve(10, 0, 1000, 1)
    assert cfg.lr_decay_epochs == [3, 6, 9]
    steps = resolved(train_steps=50, batch_size=10).resolve(10, 0, 1000, 1)
    assert steps.train_steps == 50 and steps.epochs == pytest.approx(0.5)
    assert steps.lr_decay_epochs == pytest.approx([0.15, 0.3, 0.45])
    # nb_train_samples (the seed's nb_smpls_train) redefines the epoch.
    short = resolved(epochs=2, batch_size=10, nb_train_samples=100).resolve(10, 0, 1000, 1)
    assert short.train_steps == 20 and short.nb_train_samples == 100


def test_global_batch_is_split_over_the_devices():
    cfg = resolved(global_batch_size=64).resolve(10, 0, 1000, 4)
    assert cfg.batch_size == 16 and cfg.global_batch_size == 64 and cfg.lr == pytest.approx(0.025)
    with pytest.raises(ValueError, match="not divisible by the 3 devices"):
        resolved(global_batch_size=64).resolve(10, 0, 1000, 3)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 32"):
        resolved(image_size=100).validate()
    with pytest.raises(ValueError, match="unknown train config key"):
        TrainConfig.from_dict({"data": "d", "out": "o", "batchsize": 3})
    with pytest.raises(ValueError, match="no data set"):
        TrainConfig(out="o").validate()
    with pytest.raises(ValueError, match="precision_mode is an Ascend adapter option"):
        resolved(precision_mode="allow_mix_precision").validate()
    with pytest.raises(ValueError, match="no bf16"):
        resolved(device="npu", precision="bf16").validate()
    with pytest.raises(HrnetError, match="the data set has 10 classes"):
        resolved(num_classes=5).resolve(10, 0, 1000, 1)
    with pytest.raises(HrnetError, match="smaller than one global batch"):
        resolved(batch_size=64).resolve(10, 0, 100, 2)


def test_npu_defaults_to_mixed_precision_with_the_matching_precision_mode():
    cfg = resolved(device="npu").resolve(10, 0, 1000, 8)
    assert cfg.precision == "mixed_fp16" and cfg.precision_mode == "allow_mix_precision"
    fp32 = resolved(device="npu", precision="fp32").resolve(10, 0, 1000, 8)
    assert fp32.precision_mode == "allow_fp32_to_fp16"


def test_flags_override_the_yaml_file_and_the_saved_config_round_trips(tmp_path):
    (tmp_path / "c.yaml").write_text("data: /d\nout: /o\nmodel: w18_small_v1\nlr: 0.5\nflip: false\n"
                                     "area_range: [0.3, 1.0]\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.2", "--label-smoothing", "0.1",
                              "--lr-decay-epochs", "2", "4", "--no-nesterov"])
    cfg = from_args(args)
    assert cfg.lr == 0.2 and cfg.label_smoothing == 0.1 and cfg.lr_decay_epochs == [2.0, 4.0]
    assert cfg.flip is False and cfg.nesterov is False and cfg.area_range == (0.3, 1.0)
    assert cfg.model == "w18_small_v1" and cfg.batch_size == 32  # from the file; the default
    cfg = cfg.resolve(10, 0, 1000, 1)
    cfg.save(str(tmp_path))
    assert load_saved(str(tmp_path)) == cfg
    check_resumable(load_saved(str(tmp_path)), cfg.replace(train_steps=5, log_every=1))
    with pytest.raises(HrnetError, match="image_size=224, but this run asks for image_size=64"):
        check_resumable(cfg, cfg.replace(image_size=64))


@pytest.mark.parametrize("step", [0, 1, 9, 10, 11, 29, 30, 31, 59, 60, 89, 90, 91, 199])
def test_schedules_give_the_same_lr_for_python_and_tensor_steps(step):
    import tensorflow as tf

    for fn in (schedules.make_schedule("piecewise", 0.4, 200, 2.0, decay_epochs=[5, 15, 30], warmup_epochs=2),
               schedules.make_schedule("cosine", 0.4, 200, 2.0, warmup_epochs=2)):
        assert float(fn(tf.constant(step, tf.int64))) == pytest.approx(fn(step), rel=1e-5, abs=1e-7)


def test_schedule_values():
    piecewise = schedules.make_schedule("piecewise", 0.1, 100, 10.0, decay_epochs=[3, 6, 9])
    assert [piecewise(s) for s in (0, 29, 30, 59, 60, 90, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])
    warm = schedules.make_schedule("piecewise", 0.1, 100, 10.0, decay_epochs=[5], warmup_epochs=1)
    assert [warm(s) for s in (0, 4, 9, 10, 49, 50)] == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.1, 0.01])
    cosine = schedules.make_schedule("cosine", 0.1, 100, 10.0)
    assert cosine(0) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.05) and cosine(100) == pytest.approx(0)
    assert math.isclose(cosine(25), 0.05 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="unknown lr schedule"):
        schedules.make_schedule("linear", 0.1, 100, 10.0)


def test_precision_is_decided_by_one_rule():
    """hrnet.runtime.resolve_precision: what the config resolves, the backends set up and
    the validate step checks."""
    from hrnet.runtime import resolve_precision

    assert resolve_precision("cpu") == ("fp32", None)
    assert resolve_precision("gpu", "bf16") == ("bf16", None)
    assert resolve_precision("npu") == ("mixed_fp16", "allow_mix_precision")
    assert resolve_precision("npu", "fp32") == ("fp32", "allow_fp32_to_fp16")
    assert resolve_precision("npu", "fp32", "force_fp32") == ("fp32", "force_fp32")
    with pytest.raises(ValueError, match="Ascend 910 has no bf16"):
        resolve_precision("npu", "bf16")
    with pytest.raises(ValueError, match="precision_mode is an Ascend adapter option"):
        resolve_precision("gpu", None, "force_fp32")
    resolved = TrainConfig(data="d", out="o", device="npu", precision="fp32").resolve(10, 0, 100, 1)
    assert (resolved.precision, resolved.precision_mode) == resolve_precision("npu", "fp32")

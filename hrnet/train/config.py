"""The training configuration: one dataclass, from CLI flags and/or a YAML file.

Every field is a CLI flag (``--batch-size`` for ``batch_size``) and a YAML key; flags
override the file, the file overrides the defaults. Fields left as None are filled in by
``resolve`` once the data set and the device count are known (number of classes, global
batch, lr by the linear scaling rule, number of steps), and the resolved config is saved
as ``train_config.yaml`` beside the checkpoints: it is what evaluate/export read, and
what a resumed run is checked against.

Defaults are the official HRNet recipe (REFERENCE.md section 1): SGD momentum 0.9 with
nesterov, lr 0.1 per 256 images, x0.1 at epochs 30/60/90 of 100, L2 1e-4 over all
trainable weights, RandomResizedCrop(area 0.08-1, aspect 3/4-4/3) and horizontal flip.
"""
import argparse
import dataclasses
import math
import os
import random
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from hrnet import configs
from hrnet.data.augment import Augment
from hrnet.data.stream import DATA_CACHE_GB
from hrnet.errors import HrnetError
from hrnet.fileio import atomic_write
from hrnet.run_folder import CONFIG_FILE
from hrnet.runtime import DEVICES, NPU_PRECISION_MODES, PRECISIONS, resolve_precision

# The paper's schedule length, when neither epochs nor train_steps is given.
DEFAULT_EPOCHS = 100.0

# The seed's iterations_per_loop on Ascend; each loop still ends at the next log line.
NPU_STEPS_PER_LOOP = 100
SCHEDULES = ("piecewise", "cosine")


def _f(default, help_text: str, **kw):
    """A field with its CLI help text (the flags are generated from the fields)."""
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help_text, **kw))
    return field(default=default, metadata=dict(help=help_text, **kw))


@dataclass
class TrainConfig:
    # What to train on and where to write.
    data: str = _f("", "data set folder or URI (output of `hrnet convert`); required, as a flag or in --config")
    out: str = _f("", "checkpoint folder or URI; an existing one is resumed from its latest checkpoint; required, "
                      "as a flag or in --config")
    model: str = _f("w18", "HRNet config: %s (or an alias: w18_s4, w30_s4, timm's hrnet_w18_small, ...), or a "
                           "YAML file" % ", ".join(configs.available()))
    num_classes: Optional[int] = _f(None, "number of classes (default: from the data set)")
    label_offset: Optional[int] = _f(None, "label of class 0 in the records (default: from the data set; 1 for slim)")
    image_size: int = _f(224, "training crop size in pixels (a multiple of 32)")
    # Devices.
    device: str = _f("cpu", "cpu, gpu or npu", choices=DEVICES)
    mirrored: bool = _f(False, "gpu: one process drives all visible GPUs (MirroredStrategy) instead of one per GPU")
    # Batch and length.
    batch_size: int = _f(32, "images per device per step (the seed's --batch_size)")
    global_batch_size: Optional[int] = _f(None, "images per step over all devices (default: batch_size x devices)")
    epochs: Optional[float] = _f(None, "epochs to train (default 100 unless --train-steps is given)")
    train_steps: Optional[int] = _f(None, "optimizer steps to train (overrides --epochs)")
    nb_train_samples: Optional[int] = _f(None, "images per epoch (default: the train split's size; the seed's "
                                               "--nb_smpls_train)")
    # Optimizer and schedule.
    lr: Optional[float] = _f(None, "peak learning rate (default: 0.1 x global batch / 256)")
    schedule: str = _f("piecewise", "lr schedule", choices=SCHEDULES)
    lr_decay_epochs: Optional[List[float]] = _f(None, "piecewise: epochs where lr is multiplied by --lr-decay "
                                                      "(default: 30/60/90 scaled to the run's epochs)", nargs="+")
    lr_decay: float = _f(0.1, "piecewise: lr multiplier at each decay epoch")
    warmup_epochs: float = _f(0.0, "linear lr warmup, in epochs")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    weight_decay: float = _f(1e-4, "L2 penalty over all trainable weights (wd/2 * sum w^2, as PyTorch's weight decay)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    # Numerics.
    precision: Optional[str] = _f(None, "fp32, mixed_fp16 (dynamic loss scaling) or bf16 (default: mixed_fp16 on "
                                        "npu, fp32 elsewhere)", choices=PRECISIONS)
    precision_mode: Optional[str] = _f(None, "npu: the adapter's precision_mode (default: allow_mix_precision for "
                                             "mixed_fp16, allow_fp32_to_fp16 for fp32)", choices=NPU_PRECISION_MODES)
    # Fine-tuning.
    verify_data: bool = _f(False, "check every shard's sha256 against the data set's manifest.json before training "
                                  "(sizes are always checked; remote data is hashed as it is downloaded)")
    data_cache_gb: float = _f(DATA_CACHE_GB, "GB of local disk per server for data streamed from object storage: "
                                             "each process fetches the shards it will read a bounded amount ahead "
                                             "and deletes each once read (or keeps them all when its share fits); "
                                             "0: download the splits whole before step 1")
    init_from: Optional[str] = _f(None, "start from these weights: the output of `hrnet import-weights`, a "
                                        "checkpoint folder, or an official / timm PyTorch .pth (a path or an s3:// "
                                        "URI); the classifier is re-initialised if the class count differs "
                                        "(default: none, from scratch)")
    # Augmentation (train split only).
    area_range: Tuple[float, float] = _f(Augment.area_range, "RandomResizedCrop area range", nargs=2)
    aspect_range: Tuple[float, float] = _f(Augment.aspect_range, "RandomResizedCrop aspect ratio range", nargs=2)
    flip: bool = _f(Augment.flip, "random horizontal flip")
    # Bookkeeping.
    eval_every: Optional[int] = _f(None, "validate every N epochs and at the end, keeping the best weights by "
                                         "validation top-1 (default: every epoch when the data set has validation "
                                         "records; 0: never)")
    checkpoint_every: int = _f(1000, "save a checkpoint every N steps, and at each validation and the end")
    keep_checkpoints: int = _f(3, "keep the last K checkpoints")
    log_every: int = _f(100, "a log line (and history.jsonl, TensorBoard) every N steps")
    steps_per_loop: Optional[int] = _f(None, "steps per call into the compiled loop, so that the host is not in the "
                                             "way on fast devices; the npu adapter's loop sinking (iterations per "
                                             "loop). Log lines, checkpoints and validations still come on their "
                                             "steps (default: %d on npu, 1 elsewhere)" % NPU_STEPS_PER_LOOP)
    seed: Optional[int] = _f(None, "random seed for weights and input order (default: random)")

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Dict[str, Any], where: str = "the config") -> "TrainConfig":
        """A config from plain values (YAML, JSON, flags); ValueError naming the first key
        whose value has the wrong type."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError("unknown train config key(s) in %s: %s" % (where, ", ".join(unknown)))
        hints = field_types()
        checked = {}
        for name, value in values.items():
            if value is not None:
                value = _coerce(where, name, value, hints[name], is_list(name))
            checked[name] = value
        for name in ("area_range", "aspect_range"):
            if checked.get(name) is not None:
                if len(checked[name]) != 2:
                    raise ValueError("%s: %s must be two numbers (min, max), got %r" % (where, name, values[name]))
                checked[name] = tuple(checked[name])
        return cls(**checked)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        values = configs.read_yaml_mapping(path, "train config", "TrainConfig keys to values")
        return cls.from_dict(values, where=path)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("area_range", "aspect_range"):
            d[name] = list(d[name])
        return d

    def save(self, directory: str) -> str:
        return atomic_write(os.path.join(directory, CONFIG_FILE), yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ---- checks -------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad value; returns self."""
        if not self.data:
            raise ValueError("no data set: give --data DIR")
        if not self.out:
            raise ValueError("no output folder: give --out DIR")
        _choice("device", self.device, DEVICES)
        _choice("schedule", self.schedule, SCHEDULES)
        resolve_precision(self.device, self.precision, self.precision_mode)
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError("image_size must be a positive multiple of 32, got %s" % self.image_size)
        for name in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be >= 1, got %s" % (name, getattr(self, name)))
        if self.eval_every is not None and self.eval_every < 0:
            raise ValueError("eval_every must be >= 0 (0: no validation), got %s" % self.eval_every)
        for name in ("global_batch_size", "train_steps", "nb_train_samples", "num_classes", "steps_per_loop"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError("%s must be >= 1, got %s" % (name, value))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError("%s must be a finite number, got %s" % (f.name, v))
        if self.data_cache_gb < 0:
            raise ValueError("data_cache_gb must be >= 0 (0: no streaming), got %s" % self.data_cache_gb)
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be > 0, got %s" % self.epochs)
        if self.lr is not None and self.lr <= 0:
            raise ValueError("lr must be > 0, got %s" % self.lr)
        if self.lr_decay <= 0:
            raise ValueError("lr_decay must be > 0 (the lr's multiplier at each decay epoch), got %s" % self.lr_decay)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1), got %s" % self.label_smoothing)
        if self.weight_decay < 0 or self.warmup_epochs < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay and warmup_epochs must be >= 0 and momentum in [0, 1)")
        self.augment()  # checks the ranges
        return self

    def augment(self) -> Augment:
        """The training augmentation this config asks for."""
        return Augment(area_range=self.area_range, aspect_range=self.aspect_range, flip=self.flip)

    # ---- resolution -----------------------------------------------------------------
    def resolve(self, num_classes: int, label_offset: int, train_count: int, num_replicas: int,
                validation_count: int = 0) -> "TrainConfig":
        """Fill in what depends on the data set and the device count; returns a new config.

        num_replicas: devices taking part in one synchronous step (all workers together).
        """
        self.validate()
        eval_every = self.eval_every if self.eval_every is not None else (1 if validation_count else 0)
        if eval_every and not validation_count:
            raise HrnetError("eval_every %d asks for validation, but the data set has no validation records "
                             "(--eval-every 0 trains without it)" % eval_every)
        if self.num_classes is not None and self.num_classes != num_classes:
            raise HrnetError(
                "num_classes %d was asked for, but the data set has %d classes" % (self.num_classes, num_classes)
            )
        if self.global_batch_size is not None:
            if self.global_batch_size % num_replicas:
                raise ValueError(
                    "global_batch_size %d is not divisible by the %d devices" % (self.global_batch_size, num_replicas)
                )
            batch_size = self.global_batch_size // num_replicas
        else:
            batch_size = self.batch_size
        global_batch = batch_size * num_replicas
        samples = self.nb_train_samples or train_count
        if samples < global_batch:
            raise HrnetError(
                "an epoch of %d images is smaller than one global batch of %d; lower --batch-size"
                % (samples, global_batch)
            )
        steps_per_epoch = samples / global_batch
        if self.train_steps is not None:
            train_steps = self.train_steps
            epochs = train_steps / steps_per_epoch
        else:
            epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS
            train_steps = max(1, int(round(epochs * steps_per_epoch)))
        from hrnet.train import schedules

        decay_epochs = self.lr_decay_epochs
        if decay_epochs is None and self.schedule == "piecewise":
            decay_epochs = [round(e, 6) for e in schedules.scaled_boundaries(epochs)]
        precision, precision_mode = resolve_precision(self.device, self.precision, self.precision_mode)
        # Drawn once and saved, so that a resumed run continues the input order it started with.
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2 ** 31)
        return self.replace(
            num_classes=num_classes,
            label_offset=label_offset,
            batch_size=batch_size,
            global_batch_size=global_batch,
            nb_train_samples=samples,
            epochs=round(epochs, 6),
            train_steps=train_steps,
            lr=self.lr if self.lr is not None else schedules.scaled_lr(global_batch),
            lr_decay_epochs=list(decay_epochs) if decay_epochs is not None else None,
            precision=precision,
            precision_mode=precision_mode,
            seed=seed,
            eval_every=eval_every,
            steps_per_loop=self.steps_per_loop or (NPU_STEPS_PER_LOOP if self.device == "npu" else 1),
        )

    @property
    def steps_per_epoch(self) -> float:
        """Steps in one epoch (fractional); valid on a resolved config."""
        return self.nb_train_samples / float(self.global_batch_size)

    def validation_steps(self) -> List[int]:
        """The steps after which a resolved config validates: every eval_every epochs, and
        the last step; [] without validation."""
        if not self.eval_every:
            return []
        every = self.eval_every * self.steps_per_epoch
        steps = {int(round(k * every)) for k in range(1, int(self.train_steps / every) + 1)}
        return sorted(s for s in steps | {self.train_steps} if 0 < s <= self.train_steps)

    def lr_schedule(self):
        """step -> lr of a resolved config (hrnet.train.schedules)."""
        from hrnet.train import schedules

        return schedules.make_schedule(
            self.schedule, self.lr, self.train_steps, self.steps_per_epoch,
            decay_epochs=self.lr_decay_epochs or (), warmup_epochs=self.warmup_epochs, decay=self.lr_decay,
        )


# These must match between a checkpoint folder and the run resuming into it: anything else
# (length, logging, checkpoint cadence) may change on a resume.
RESUME_KEYS = ("model", "num_classes", "image_size", "precision")


def check_resumable(saved: "TrainConfig", new: "TrainConfig") -> None:
    for key in RESUME_KEYS:
        a, b = getattr(saved, key), getattr(new, key)
        if a != b:
            raise HrnetError(
                "%s already holds a run with %s=%s, but this run asks for %s=%s; use another --out"
                % (new.out, key, a, key, b)
            )


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError("%s must be one of %s, got %r" % (name, ", ".join(choices), value))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, plus --config FILE.yaml. Flags left out do not
    appear in the parsed namespace, so they never override the YAML file."""
    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    hints = field_types()
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "default" not in help_text and default != "":  # "" is no default worth printing: required
            help_text = "%s (default: %s)" % (help_text, default)
        if kind is bool:
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        parser.add_argument(flag(f.name), dest=f.name, type=finite_float if kind is float else kind,
                            default=argparse.SUPPRESS, help=help_text, **meta)


def _coerce(where: str, name: str, value, kind: type, is_list: bool):
    """``value`` as the field's type; ints pass as floats and whole floats as ints, nothing else
    is converted."""
    if is_list:
        if not isinstance(value, (list, tuple)):
            raise ValueError("%s: %s must be a list of numbers, got %r" % (where, name, value))
        return [_coerce(where, name, v, kind, False) for v in value]
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    # A KFP struct (the pipeline's train_config) carries every number as a double.
    if kind is int and isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    if not ok:
        raise ValueError("%s: %s must be %s, got %r" % (where, name, words[kind], value))
    return value


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be a finite number, not %s" % text)
    return value


def field_types() -> Dict[str, type]:
    """The scalar type of each field (of its items, for a list or tuple field), for argparse."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        while typing.get_origin(hint) in (typing.Union, list, tuple):  # Optional[X], List[X], Tuple[X, X]
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[name] = hint
    return out


def is_list(name: str) -> bool:
    """Whether the field takes several values (a list or tuple)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return any(typing.get_origin(a) in (list, tuple) for a in args)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The config from --config (if any) with the given flags on top."""
    base = TrainConfig.from_yaml(args.config).to_dict() if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(base)


def load_saved(directory: str) -> Optional[TrainConfig]:
    """The resolved config saved in a checkpoint folder, or None if there is none."""
    path = os.path.join(directory, CONFIG_FILE)
    return TrainConfig.from_yaml(path) if os.path.exists(path) else None

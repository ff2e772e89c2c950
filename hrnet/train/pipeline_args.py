"""The KFP pipeline's training parameters: the contract between TrainConfig and the
pipeline (its run form, the validate step and the train steps' ``hrnet train`` command).

The pipeline shows a few TrainConfig fields as parameters of their own (PIPELINE_FIELDS)
and takes every other one in its structured ``train_config`` parameter; the validate step
checks them all (check_pipeline_parameters) and hands the train step typed TrainConfig
values, which become ``hrnet train`` flags (train_command).
"""
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List

from hrnet import configs
from hrnet.runtime import check_devices, check_nodes, cluster, resolve_precision
from hrnet.serving.deploy import check_service
from hrnet.storage import is_remote
from hrnet.train.config import DEFAULT_EPOCHS, TrainConfig, field_types, flag

# The TrainConfig fields the pipeline's run form shows as parameters of their own; every
# other field is a key of its structured ``train_config`` parameter.
PIPELINE_FIELDS = ("model", "batch_size", "epochs", "train_steps", "lr", "precision", "image_size", "seed",
                   "init_from")
# Fields the pipeline fills in itself: the data reference, the Model artifact, the compile target.
PIPELINE_SET = ("data", "out", "device")


@dataclass(frozen=True)
class Parameter:
    """One pipeline parameter: what its signature, its run-form description and
    ``python -m pipelines run-local``'s flag are made from."""
    name: str
    type: type
    default: Any
    description: str


def _known_default(name: str, device: str) -> Any:
    """The value a None field resolves to where the compiled pipeline can know it (its target's
    device fixes the precision); None where it depends on the run (lr on the global batch, a
    random seed, train_steps on the data set's size)."""
    if name == "epochs":
        return DEFAULT_EPOCHS
    if name == "precision":
        return resolve_precision(device)[0]
    return None


def pipeline_parameters(device: str = "cpu") -> List[Parameter]:
    """PIPELINE_FIELDS as pipeline parameters of a pipeline for ``device``, from the TrainConfig
    fields. KFP parameters cannot be None: a field whose default is None shows its real default
    where that is known when compiling, and otherwise 0 / "" for "the default"."""
    hints = field_types()
    out = []
    for name in PIPELINE_FIELDS:
        f = TrainConfig.__dataclass_fields__[name]
        kind = hints[name]
        value = f.default if f.default is not None else _known_default(name, device)
        # Flags become parameter names: the run form has no --train-steps, it has train_steps.
        text = re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), f.metadata["help"])
        if value is None:
            text += "; %s means the default" % ('""' if kind is str else 0)
            value = kind()
        out.append(Parameter(name, kind, value, text + "."))
    return out


def _from_pipeline(name: str, value):
    """A pipeline parameter's value as the TrainConfig field's: 0 / "" -> None where None is the default."""
    return None if TrainConfig.__dataclass_fields__[name].default is None and not value else value


def check_pipeline_parameters(data_uri: str, devices: int, device: str, train_config: Dict[str, Any],
                              nodes: int = 1, deploy_name: str = "hrnet", serving_runtime: str = "tensorflow",
                              train_devices: int = cluster.MAX_DEVICES, **fields) -> Dict[str, Any]:
    """Check a pipeline run's parameters before any pod asks for accelerators; ValueError
    naming the first bad one. ``fields``: the PIPELINE_FIELDS. Returns the train step's config:
    the TrainConfig values the run sets, typed (train_command's input). ``train_devices``: the
    devices the compiled pipeline's single train pod has CPU and memory for. What ``data_uri``
    holds (an image tree or TFRecords) is for the prepare-data step to find: this step has no
    object-store credentials and does not mount /data."""
    if sorted(fields) != sorted(PIPELINE_FIELDS):
        raise TypeError("check_pipeline_parameters takes the fields %s, got %s" % (PIPELINE_FIELDS, sorted(fields)))
    if not data_uri:
        raise ValueError("data_uri is required: an image tree to convert or TFRecords, as an s3:// / minio:// URI "
                         "or a path under /data")
    if "://" in data_uri and not is_remote(data_uri):
        # A URI of another store is refused now, not by the prepare-data step's stack trace.
        raise ValueError(f"data_uri {data_uri!r} is neither an s3:// / minio:// URI nor a path")
    init_from = fields["init_from"]
    if init_from and not is_remote(init_from) and not os.path.exists(init_from):
        raise ValueError(f"init_from {init_from!r} is neither an s3:// / minio:// URI nor a path here (weights of "
                         "`hrnet import-weights` or `hrnet train`, or a PyTorch .pth)")
    configs.canonical_name(fields["model"])
    check_service(deploy_name, serving_runtime)
    check_devices(devices)
    check_nodes(nodes)
    if nodes == 1 and devices > train_devices:
        raise ValueError(f"devices={devices}, but this pipeline's train pod was compiled with CPU and memory for "
                         f"{train_devices}: compile it again with `python -m pipelines compile --train-devices "
                         f"{devices}`")
    if not isinstance(train_config, dict):
        raise ValueError(f"train_config must be a mapping of TrainConfig keys to values, got {train_config!r}")
    taken = sorted(set(train_config) & set(PIPELINE_FIELDS + PIPELINE_SET))
    if taken:
        raise ValueError(f"train_config may not set {taken[0]}: the pipeline sets it (from its own parameters)")
    values = dict(train_config, device=device, **{k: _from_pipeline(k, v) for k, v in fields.items()})
    values = {k: v for k, v in values.items() if v is not None}
    config = TrainConfig.from_dict(dict(values, data=data_uri, out="(the Model artifact)"),
                                   where="train_config").validate().to_dict()
    return {k: config[k] for k in values}


def to_flags(values: Dict[str, Any]) -> List[str]:
    """TrainConfig values as ``hrnet train`` flags (add_arguments parses them back)."""
    hints = field_types()
    flags = []
    for name, value in TrainConfig.from_dict(values).to_dict().items():
        if name not in values or value is None:
            continue
        if hints[name] is bool:
            flags.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            flags += [flag(name)] + [str(v) for v in (value if isinstance(value, list) else [value])]
    return flags


def train_command(data: str, out: str, config: Dict[str, Any]) -> List[str]:
    """The ``hrnet train`` command line of a pipeline run, from check_pipeline_parameters' config."""
    return ["hrnet", "train", "--data", data, "--out", out] + to_flags(config)

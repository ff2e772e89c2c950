"""HRNet classification configs, kept as data (one YAML file per official model).

The seed's names (``w18_s4``, ``w30_s4``) and timm's (``hrnet_w18_small``, ...) are
aliases of the official names.
"""
import os
from typing import Any, Dict, List

import yaml

_HERE = os.path.dirname(os.path.abspath(__file__))

ALIASES = {
    "w18_s4": "w18",
    "w30_s4": "w30",
    "hrnet_w18_small": "w18_small_v1",
    "hrnet_w18_small_v2": "w18_small_v2",
}
ALIASES.update({"hrnet_w%d" % w: "w%d" % w for w in (18, 30, 32, 40, 44, 48, 64)})


def available() -> List[str]:
    """Official config names, sorted by size."""
    names = [f[:-5] for f in os.listdir(_HERE) if f.endswith(".yaml")]
    return sorted(names, key=lambda n: (not n.startswith("w18_small"), int(n[1:3]), n))


def canonical_name(name: str) -> str:
    """The official name for ``name`` or an alias; ValueError listing the known ones. A timm
    name may carry its pretrained tag (``hrnet_w18.ms_aug_in1k``): the tag names weights,
    not an architecture."""
    base, dot, _ = name.partition(".")
    if dot and base in ALIASES:
        name = base
    name = ALIASES.get(name, name)
    if name not in available():
        raise ValueError(
            "unknown HRNet model %r; known: %s (aliases: %s)"
            % (name, ", ".join(available()), ", ".join(sorted(ALIASES)))
        )
    return name


def load(name: str) -> Dict[str, Any]:
    """The config dict of a model name, an alias, or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) and os.path.exists(name):
        path = name
    else:
        path = os.path.join(_HERE, canonical_name(name) + ".yaml")
    cfg = read_yaml_mapping(path, "model config", "stem, stages, head_channels, ...")
    _validate(cfg, path)
    return cfg


def read_yaml_mapping(path: str, what: str, keys: str) -> Dict[str, Any]:
    """The mapping in the YAML file ``path`` (a ``what``, with ``keys``); ValueError naming
    the file, and the line, for what is not one. An empty file is an empty mapping."""
    if not os.path.exists(path):
        raise FileNotFoundError("no such %s file: %s" % (what, path))
    if os.path.isdir(path):
        raise ValueError("%s is a folder, not a %s file (YAML)" % (path, what))
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = " at line %d, column %d" % (mark.line + 1, mark.column + 1) if mark else ""
        raise ValueError("%s is not valid YAML%s: %s" % (path, where, getattr(e, "problem", None) or e)) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError("%s: a %s must be a mapping (%s)" % (path, what, keys))
    return values


def _validate(cfg: Dict[str, Any], path: str) -> None:
    stages = cfg.get("stages")
    if not isinstance(stages, list) or len(stages) != 4:
        raise ValueError("%s: 'stages' must list 4 stages" % path)
    for s, stage in enumerate(stages, 1):
        if stage.get("block") not in ("BASIC", "BOTTLENECK"):
            raise ValueError("%s: stage %d block must be BASIC or BOTTLENECK" % (path, s))
        if len(stage["num_blocks"]) != s or len(stage["num_channels"]) != s:
            raise ValueError("%s: stage %d needs %d branches" % (path, s, s))
    if len(cfg.get("head_channels", [])) != 4:
        raise ValueError("%s: 'head_channels' must have 4 widths" % path)

"""Every training parameter is declared once: TrainConfig's fields (hrnet/train/config.py,
shown to the pipeline by hrnet/train/pipeline_args.py) and the pipeline's own parameters
(pipelines/parameters.py). These tests add nothing; they read the declarations and check
that each place made from them agrees: the ``hrnet train`` flags, the YAML / train_config
keys, the compiled pipeline of every target (names, types, defaults, run-form
descriptions), ``python -m pipelines run-local``'s flags and the components' inputs."""
import argparse
import dataclasses
import typing

import pytest
import yaml

from components import images
from components.train import train
from components.validate import validate
from hrnet import cli
from hrnet.train import config as train_config
from hrnet.train import pipeline_args
from hrnet.train.config import TrainConfig
from hrnet.train.pipeline_args import PIPELINE_FIELDS, PIPELINE_SET
from pipelines import __main__ as pipelines_cli
from pipelines import parameters
from pipelines.__main__ import compile_pipeline

IR_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN", dict: "STRUCT"}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def scalar(field) -> type:
    """The field's scalar type, read from its annotation (Optional[int] -> int, Tuple[float, float] -> float)."""
    kind = typing.get_type_hints(TrainConfig)[field.name]
    while typing.get_origin(kind) in (typing.Union, list, tuple):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def default(field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def options(parser):
    return {a.dest: a for a in parser._actions if a.option_strings}


@pytest.fixture(scope="module", params=images.TARGETS)
def compiled_inputs(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ir") / "pipeline.yaml")
    compile_pipeline(request.param, path)
    with open(path) as f:
        ir = next(yaml.safe_load_all(f))
    return request.param, ir["root"]["inputDefinitions"]["parameters"]


def test_the_compiled_pipeline_has_exactly_the_declared_parameters(compiled_inputs):
    target, compiled_inputs = compiled_inputs
    # KFP writes them sorted by name, and its UI shows them in that order: the run form's order is not ours to set.
    assert list(compiled_inputs) == sorted(parameters.NAMES)
    for param in parameters.parameters_for(images.TRAIN_POD[target]["device"]):
        got = compiled_inputs[param.name]
        assert got["parameterType"] == IR_TYPES[param.type], param.name
        if param.default is parameters.REQUIRED:
            # No default, so KFP marks it required: its UI asks for it, its API refuses a run without it.
            assert "defaultValue" not in got and not got.get("isOptional"), param.name
        else:
            assert got["defaultValue"] == param.default and got["isOptional"], param.name
        assert got["description"] == param.description, param.name


def test_the_run_form_shows_real_defaults_where_the_target_fixes_them(compiled_inputs):
    """The precision a target trains in by default, and the schedule's 100 epochs, are the
    form's values; a run given them trains exactly as one that leaves the fields unset."""
    target, compiled_inputs = compiled_inputs
    device = images.TRAIN_POD[target]["device"]
    assert compiled_inputs["precision"]["defaultValue"] == {"npu": "mixed_fp16"}.get(device, "fp32")
    assert compiled_inputs["epochs"]["defaultValue"] == 100.0
    run = {p.name: p.default for p in parameters.parameters_for(device)}
    shown = pipeline_args.check_pipeline_parameters(**parameters.validate_arguments(
        dict(run, data_uri="s3://b/images"), device, 8))
    data = dict(num_classes=10, label_offset=0, train_count=12800, num_replicas=1)
    unset = TrainConfig(data="d", out="o", device=device, model=run["model"]).resolve(**data)
    given = TrainConfig.from_dict(dict(shown, data="d", out="o")).resolve(**data)
    assert (given.precision, given.epochs, given.train_steps) == (unset.precision, unset.epochs, unset.train_steps)


def test_pipeline_training_parameters_are_the_train_config_fields():
    declared = {p.name: p for p in parameters.PARAMETERS}
    for name in PIPELINE_FIELDS:
        param, field = declared[name], FIELDS[name]
        assert param.type is scalar(field), name
        # KFP has no None: the real default where the compiled pipeline knows it, otherwise
        # 0 / "" stand for None and the validate step turns them back.
        if field.default is None and name in ("epochs", "precision"):
            assert param.default == pipeline_args._known_default(name, "cpu") != param.type()
            assert "means the default" not in param.description
        elif field.default is None:
            assert param.default == param.type() and pipeline_args._from_pipeline(name, param.default) is None
        else:
            assert param.default == default(field)
        words = field.metadata["help"].replace("--", "").replace("-", "_").split()
        assert param.description.replace("-", "_").split()[:len(words) - 1] == words[:-1], name
    # What the pipeline fills in itself is no parameter, and no train_config key may set it.
    assert not set(PIPELINE_SET) & set(parameters.NAMES)


def test_every_train_config_field_is_an_hrnet_train_flag():
    flags = options(cli.build_parser("train"))
    # Besides the fields: --config FILE.yaml, --force (run options, not training settings) and --help.
    assert set(flags) - set(FIELDS) == {"config", "force", "help"} and set(FIELDS) <= set(flags)
    for name, field in FIELDS.items():
        action = flags[name]
        assert "--" + name.replace("_", "-") in action.option_strings
        assert action.help.startswith(field.metadata["help"]), name
        if scalar(field) is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), name
        else:
            kind = train_config.finite_float if scalar(field) is float else scalar(field)
            assert action.type is kind, name
        assert action.choices == field.metadata.get("choices"), name


def test_run_local_has_a_flag_per_pipeline_parameter_with_the_demo_values():
    run_local = pipelines_cli.build_parser()._subparsers._group_actions[0].choices["run-local"]
    flags = options(run_local)
    for param in parameters.PARAMETERS:
        action = flags[param.name]
        assert action.default == pipelines_cli.DEMO.get(param.name, param.default), param.name
        assert action.help.startswith(param.description.replace("%", "%%")), param.name
    assert set(pipelines_cli.DEMO) <= set(parameters.NAMES)
    # The demo's extra settings are train_config keys the validate step accepts.
    TrainConfig.from_dict(pipelines_cli.DEMO["train_config"]).replace(data="d", out="o").validate()


def test_the_components_take_the_declared_parameters():
    inputs = validate.component_spec.inputs
    assert set(inputs) == {"data_uri", "devices", "nodes", "device", "train_config",
                           "deploy_name", "serving_runtime", "train_devices", *PIPELINE_FIELDS}
    declared = {p.name: p for p in parameters.PARAMETERS}
    for name, spec in inputs.items():
        if name in declared:
            assert spec.type == {str: "String", int: "Integer", float: "Float", bool: "Boolean",
                                 dict: "Dict"}[declared[name].type], name
    # The train step names no training parameter: it takes the validate step's checked config.
    assert set(train.component_spec.inputs) == {"dataset", "config", "devices", "checkpoint_uri"}


def test_the_train_command_carries_every_field_back():
    """train_command's flags, parsed by ``hrnet train``, give back every field set, each
    away from its default."""
    values = {}
    for name, field in FIELDS.items():
        kind, base = scalar(field), default(field)
        if field.metadata.get("choices"):
            value = next(c for c in field.metadata["choices"] if c != base)
        elif kind is bool:
            value = not base
        elif kind is str:
            value = "s3://bucket/" + name
        elif isinstance(base, (list, tuple)) or field.metadata.get("nargs"):
            value = [0.25, 0.5]
        else:
            value = kind(7) if base is None else base + kind(3)
        values[name] = value
    data, out = values.pop("data"), values.pop("out")
    command = pipeline_args.train_command(data, out, values)
    assert command[:2] == ["hrnet", "train"]
    parsed = train_config.from_args(cli.build_parser("train").parse_args(command[2:]))
    assert parsed == TrainConfig.from_dict(dict(values, data=data, out=out))
    assert all(getattr(parsed, k) != default(f) for k, f in FIELDS.items())

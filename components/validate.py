"""First step: check the run's parameters before any pod asks for accelerators.

A bad value (devices 3, an unknown model, no data) fails this step in seconds with
a message naming it, instead of a train pod failing after it got its chips.
"""
from typing import NamedTuple

from kfp import dsl

from components.images import IMAGES


# KFP reads a component's inputs from its source, so the training fields here are written out;
# they are hrnet.train.pipeline_args.PIPELINE_FIELDS (tests/test_parameters.py checks that they agree).
@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def validate(
    data_uri: str,
    devices: int,
    nodes: int,
    device: str,
    train_config: dict,
    model: str,
    batch_size: int,
    epochs: float,
    train_steps: int,
    lr: float,
    precision: str,
    image_size: int,
    seed: int,
    init_from: str,
    deploy_name: str,
    serving_runtime: str,
    train_devices: int,
) -> NamedTuple("Checked", [("config", dict)]):
    """Raise ValueError naming the first bad parameter; ``config``: the train step's TrainConfig
    values, typed (a named output, which the run's UI shows by its name)."""
    parameters = dict(locals())  # taken before the import below adds a name of its own
    from hrnet.train.pipeline_args import check_pipeline_parameters

    return (check_pipeline_parameters(**parameters),)

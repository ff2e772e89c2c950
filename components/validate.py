"""First step: check the run's parameters before any pod asks for accelerators.

A bad value (devices 3, an unknown model, no data source) fails this step in seconds with
a message naming it, instead of a train pod failing after it got its chips.
"""
from kfp import dsl

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def validate(
    source_uri: str,
    tfrecords_uri: str,
    model: str,
    devices: int,
    device: str,
    batch_size: int,
    epochs: float,
    train_steps: int,
    lr: float,
    precision: str,
    image_size: int,
    train_options: str,
    init_from: str,
) -> str:
    """Raise ValueError naming the first bad parameter; return the data source to use:
    "convert" (an image tree to convert) or "tfrecords" (records converted before)."""
    from hrnet.train.config import check_pipeline_parameters

    return check_pipeline_parameters(source_uri, tfrecords_uri, model, devices, device, batch_size, epochs,
                                     train_steps, lr, precision, image_size, train_options, init_from)

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
) -> str:
    """Raise ValueError naming the first bad parameter; return the data source to use:
    "convert" (an image tree to convert) or "tfrecords" (records converted before)."""
    import argparse
    import os
    import shlex

    from hrnet.configs import canonical_name
    from hrnet.runtime.launch import VALID_NPROC
    from hrnet.storage import is_remote
    from hrnet.train.config import TrainConfig, add_arguments

    if bool(source_uri) == bool(tfrecords_uri):
        raise ValueError("give exactly one data source: source_uri (an image tree to convert) or tfrecords_uri "
                         "(TFRecords made by `hrnet convert` or slim); "
                         f"got source_uri={source_uri!r} tfrecords_uri={tfrecords_uri!r}")
    if tfrecords_uri and not is_remote(tfrecords_uri) and not os.path.isdir(tfrecords_uri):
        # KFP imports the records as an artifact: in a cluster that takes an object-store URI.
        raise ValueError(f"tfrecords_uri {tfrecords_uri!r} is neither an s3:// / minio:// URI nor a folder here")
    canonical_name(model)
    if devices not in VALID_NPROC:
        raise ValueError(f"devices must be one of {', '.join(map(str, VALID_NPROC))} (one training process per "
                         f"device, on one node), got {devices}")
    # train_options: `hrnet train` flags for what has no pipeline parameter of its own.
    class Flags(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(f"train_options {train_options!r}: {message}")

    parser = Flags(prog="train_options", add_help=False)
    add_arguments(parser)
    options = vars(parser.parse_args(shlex.split(train_options)))
    if options.get("config") is None:
        options.pop("config", None)  # the one flag that is always there (None when not given)
    taken = sorted(set(options) & {"config", "data", "out", "model", "device", "batch_size", "epochs",
                                   "train_steps", "lr", "precision", "image_size", "seed"})
    if taken:
        raise ValueError(f"train_options may not set --{taken[0].replace('_', '-')}: the pipeline sets it "
                         "(from its own parameters)")
    # 0 / "" stand for "the library's default" (pipeline parameters cannot be None).
    TrainConfig.from_dict(dict(
        options, data=source_uri or tfrecords_uri, out="(the train step's Model artifact)", model=model,
        device=device, batch_size=batch_size, epochs=epochs or None, train_steps=train_steps or None,
        lr=lr or None, precision=precision or None, image_size=image_size)).validate()
    return "convert" if source_uri else "tfrecords"

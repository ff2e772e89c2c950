"""Train on 1 or 8 devices: ``hrnet launch`` starts one ``hrnet train`` process per device."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    model: Output[Model],
    config: dict,
    devices: int,
    checkpoint_uri: str,
):
    """Checkpoints, portable weights, history.jsonl and TensorBoard logs in ``model``.

    ``config``: the TrainConfig values of the run (the validate step's, checked there).
    ``checkpoint_uri``: where training mirrors its checkpoints as it goes, so that a retried
    pod (or a later run) resumes there instead of starting over; "" mirrors them beside
    this step's artifact in the pipeline root, which a retry of the same task finds again
    (its output URIs are the same). A resumed run continues from its checkpoint, not from
    ``init_from``.
    """
    from hrnet import storage
    from hrnet.runtime.launch import launch
    from hrnet.train.pipeline_args import train_command

    out = checkpoint_uri or storage.sibling(model.uri, "checkpoints")
    command = train_command(dataset.path, out, config)
    code = launch(devices, command, device=config["device"])
    if code:
        raise RuntimeError(f"hrnet launch exited with code {code} (see the log above)")
    if out != model.path:
        storage.restore(out, model.path)  # the Model artifact holds the finished checkpoint too

"""Train on 1 or 8 devices: ``hrnet launch`` starts one ``hrnet train`` process per device."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    model: Output[Model],
    model_name: str,
    devices: int,
    device: str,
    batch_size: int,
    epochs: float,
    train_steps: int,
    lr: float,
    precision: str,
    image_size: int,
    seed: int,
    train_options: str,
    checkpoint_uri: str,
    init_from: str,
):
    """Checkpoints, portable weights, history.jsonl and TensorBoard logs in ``model``.

    ``train_options``: more ``hrnet train`` flags (checked by the validate step).
    ``checkpoint_uri``: where training mirrors its checkpoints as it goes, so that a retried
    pod (or a later run) resumes there instead of starting over; "" mirrors them beside
    this step's artifact in the pipeline root, which a retry of the same task finds again
    (its output URIs are the same). ``init_from``: starting weights (fine-tuning); a resumed
    run continues from its checkpoint instead.
    """
    from hrnet import storage
    from hrnet.runtime.launch import launch
    from hrnet.train.config import train_command

    out = checkpoint_uri or storage.sibling(model.uri, "checkpoints")
    command = train_command(dataset.path, out, model_name, device, batch_size, image_size, epochs, train_steps,
                            lr, precision, seed, train_options, init_from)
    code = launch(devices, command, device=device)
    if code:
        raise RuntimeError(f"hrnet launch exited with code {code} (see the log above)")
    if out != model.path:
        storage.restore(out, model.path)  # the Model artifact holds the finished checkpoint too

"""Where a run starts: its latest checkpoint (a resumed run), or other weights
(``--init-from``: ``hrnet import-weights`` output, a finished run, or an official / timm
PyTorch checkpoint), or nothing (from scratch).
"""
import logging
import os
import tempfile
from typing import Optional

from hrnet import run_folder, storage
from hrnet.errors import HrnetError
from hrnet.train.config import TrainConfig

log = logging.getLogger(__name__)


def restore_or_init(checkpoint, out_dir: str, cfg: TrainConfig) -> Optional[str]:
    """Resume from the latest checkpoint in ``out_dir``; without one, start from
    ``cfg.init_from`` (or from scratch). Returns the checkpoint resumed from."""
    import tensorflow as tf

    from hrnet import compat

    latest = tf.train.latest_checkpoint(out_dir)
    if latest:
        status = checkpoint.restore(latest)
        try:
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError) as e:
            status.expect_partial()  # no flood of "unrestored value" warnings on the way out
            raise HrnetError(
                "cannot resume from %s: it does not match this run's model and optimizer (%s). Was it written "
                "under another Keras version (this is Keras %s) or with another --model/--precision? Use a new "
                "--out; a finished run's portable weights can seed it with --init-from"
                % (latest, str(e).splitlines()[0][:120], ".".join(str(v) for v in compat.KERAS_VERSION))) from None
        log.info("resuming from %s (step %d)", os.path.basename(latest), int(checkpoint.step.numpy()))
    elif cfg.init_from:
        init_from(checkpoint.model, cfg.init_from, cfg.num_classes)
    return latest


TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar")


def init_from(model, source: str, num_classes: int) -> None:
    """Start from other weights: ``hrnet import-weights`` output, a checkpoint folder, or an
    official / timm PyTorch checkpoint (imported on the fly), each a local path or an s3:// /
    minio:// URI; a classifier of another class count is left freshly initialised."""
    from hrnet import weights

    if source.endswith(TORCH_SUFFIXES):
        with tempfile.TemporaryDirectory(prefix="hrnet-init-") as tmp:
            path = source
            if storage.is_remote(source):
                path = os.path.join(tmp, os.path.basename(source))
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(source))  # verified against the object's sha256
            values = weights.torch_to_keras(weights.torch_state_dict(path), model)
        prefix = source
    else:
        prefix = storage.local_input(source) if storage.is_remote(source) else source
        if os.path.isdir(prefix):
            prefix = os.path.join(prefix, run_folder.WEIGHTS)
        values = weights.read_weights(prefix)
    kernel = values.get(weights.CLASSIFIER + "/kernel")
    skip = kernel is not None and int(kernel.shape[-1]) != num_classes
    if skip:
        values = {k: v for k, v in values.items() if not k.startswith(weights.CLASSIFIER + "/")}
    n = weights.assign_weights(model, values, skip_classifier=skip, source=prefix)
    log.info("initialised %d tensors from %s%s", n, prefix,
             " (classifier re-initialised for %d classes)" % num_classes if skip else "")

"""``hrnet train``: the training loop (custom, tf.function, any tf.distribute strategy or the NPU).

    hrnet train --data DIR --out DIR --model w18 [--epochs 100 | --train-steps N] ...

The step itself is hrnet.train.step's, the run hrnet.train.run's. The lr is a pure function
of the step (hrnet.train.schedules) and the step is part of the checkpoint, so a resumed run
continues the schedule exactly where it stopped.

The output folder is a run folder (hrnet.run_folder), its manifest.json written last.
Running the same command again resumes from the latest checkpoint; a finished run is
left as it is. This module does not import TensorFlow (``hrnet train --help`` starts
without it): the devices are set up first, then hrnet.train.run is imported.
"""
import logging
import os
import shutil
import tempfile
from typing import Any, Dict

from hrnet import storage
from hrnet.train.config import TrainConfig, from_args
from hrnet.train.config import add_arguments as _config_arguments

log = logging.getLogger(__name__)


def train(config, force: bool = False) -> Dict[str, Any]:
    """Train (or resume) as ``config`` says; returns the checkpoint manifest.

    config: a TrainConfig, or a dict of its fields. ``force``: take the output's lease from
    another writer (storage.Lease).
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    cfg.validate()
    # TF's own INFO lines (collective set-up, checkpoint sharding) drown the progress lines.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # Device set-up first: strategies and the NPU must exist before any other TF op runs.
    from hrnet.runtime import devices

    backend = devices.setup(cfg.device, cfg.precision, cfg.precision_mode, cfg.mirrored)
    from hrnet.train.run import run_training
    if backend.is_chief:
        with storage.local_output(cfg.out, kind="checkpoint", force=force) as out_dir:
            if storage.is_remote(cfg.out):
                storage.restore(cfg.out, out_dir)  # a pod restarted elsewhere resumes from the bucket
            return run_training(cfg, backend, out_dir, out_dir)
    # Other ranks read the checkpoint to resume from (a private copy when it is remote) and
    # take part in every save, since reading mirrored variables is a collective op under
    # MultiWorkerMirroredStrategy, but they write into a scratch folder and publish nothing.
    scratch = tempfile.mkdtemp(prefix="hrnet-rank%d-" % backend.worker_index)
    try:
        read_dir = cfg.out
        if storage.is_remote(cfg.out):
            read_dir = os.path.join(scratch, "restored")
            storage.restore(cfg.out, read_dir)
        return run_training(cfg, backend, read_dir, os.path.join(scratch, "checkpoints"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    _config_arguments(parser)
    storage.add_force_argument(parser)


def run(args) -> int:
    manifest = train(from_args(args), force=args.force)
    final = manifest.get("final") or {}
    print("trained %s to step %d: loss %.4f, train top-1 %.4f; checkpoint in %s" % (
        manifest.get("model"), manifest.get("step", 0), final.get("loss", float("nan")),
        final.get("top1", float("nan")), manifest.get("out", "")))
    return 0

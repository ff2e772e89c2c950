"""What the tests share: the small model configs, class-folder JPEG trees, small outputs,
the tools they run, and killing a process at a checkpoint."""
import hashlib
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import pytest

from hrnet import manifest

CONFIGS = pathlib.Path(__file__).parent / "configs"
# HRNets with the full structure and few channels: tiny (2 branches) for resume and storage
# tests, small (four stages, ~0.75 M parameters) where the model must learn.
TINY_CONFIG = str(CONFIGS / "tiny.yaml")
SMALL_CONFIG = str(CONFIGS / "small.yaml")


def noise_image(rng, label: int, size=(32, 32)):
    """Uniform noise, the same for every class (label unused): what only the labels tell apart."""
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype="uint8")


def write_jpeg_tree(root, per_split: Dict[str, Sequence[int]], image: Optional[Callable] = None,
                    class_name: str = "class{}", file_name: str = "{}.jpg", seed: int = 0, quality: int = 90) -> str:
    """``root/<split>/<class_name>/<file_name>`` JPEGs: ``per_split[split][c]`` images of class c,
    each ``image(rng, c)`` (uint8 HxWx3; default noise_image). Returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = image or noise_image
    for split, counts in per_split.items():
        for c, n in enumerate(counts):
            folder = os.path.join(str(root), split, class_name.format(c))
            os.makedirs(folder)
            for i in range(n):
                Image.fromarray(image(rng, c)).save(os.path.join(folder, file_name.format(i)), quality=quality)
    return str(root)


def tinted_image(rng, label: int, size: int = 40):
    """A noisy texture tinted by the class, as JPEG-able uint8 RGB (not square: 40x48)."""
    import numpy as np

    tint = np.array([(label * 40) % 256, (label * 90) % 256, (255 - label * 40) % 256])
    noise = rng.integers(0, 256, size=(size, size + 8, 3))
    return ((noise + 2 * tint) / 3).astype(np.uint8)


# The tiny run (conftest's tiny_run): 6 classes; validation in 3 shards of uneven size, 23
# images that no batch size below divides, so that the eval stream's file order and its last
# partial batch both matter.
TINY_RUN_CLASSES = 6
TINY_RUN_VALIDATION = [4, 3, 5, 3, 4, 4]


def write_images(root, classes: int = 3, train: int = 8, validation: int = 2) -> str:
    """The small noise tree the storage and ownership tests convert: 3 classes, 8 + 2 each."""
    return write_jpeg_tree(root, {"train": [train] * classes, "validation": [validation] * classes})


def make_output(root, shards=3, size=3000, kind="tfrecords", big=0, seed=0, labels="tench"):
    """A small output folder like convert's: shards, labels.txt, manifest.json last."""
    os.makedirs(root, exist_ok=True)
    rng = random.Random(seed)
    names = [f"train-{i:05d}-of-{shards:05d}" for i in range(shards)]
    for i, name in enumerate(names):
        with open(os.path.join(root, name), "wb") as f:
            f.write(rng.randbytes(size + i * 17))
    if big:
        names.append("big.bin")
        with open(os.path.join(root, "big.bin"), "wb") as f:
            f.write(rng.randbytes(big))
    with open(os.path.join(root, "labels.txt"), "w") as f:
        f.write(f"0\tn01440764\t{labels}\n1\tn01443537\tgoldfish\n")
    # Equal seeds, equal bytes.
    manifest.write_manifest(root, {"kind": kind, "num_classes": 2, "created": f"seed {seed}",
                                   "shards": [manifest.file_entry(os.path.join(root, n), root) for n in names]})
    return root


def tree(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def tool(name: str) -> str:
    """A CLI the tests run: beside this Python (the test extra installs kubectl there), else on PATH."""
    beside = pathlib.Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: `make setup` installs it (pyproject.toml, extra test)")
    return found


def kill_when(command, ready: Callable[[], bool], log_path, env=None, timeout: float = 300.0,
              group: bool = False, signum: int = signal.SIGKILL) -> int:
    """Start ``command`` (its output into ``log_path``) and SIGKILL it (or send ``signum``)
    as soon as ``ready()`` holds, while it still runs: a pod lost mid-run. Fails with the
    log's tail when the process ends first or ``ready`` does not come within ``timeout``
    seconds. ``group``: the process leads a session of its own, and the kill takes its
    children with it. Returns its exit code."""
    log_path = pathlib.Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=group)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"not ready within {timeout} s: " + log_path.read_text()[-3000:]
                time.sleep(0.02)
            assert proc.poll() is None, "it ended before the kill: " + log_path.read_text()[-3000:]
        finally:
            if group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    return proc.returncode

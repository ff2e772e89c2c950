"""Learning-rate schedules as pure functions of the step.

Each schedule maps a step (a Python number or a scalar tensor) to a learning rate with
the same formula in both cases, so the training graph, the log line and a test can all
ask "what is the lr at step N" and get the same answer. The step counts optimizer steps
from 0; the lr of step N is the one used by the N-th update.

Official HRNet recipe: lr 0.1 per 256 images, x0.1 at epochs 30, 60 and 90 of 100, no
warmup (REFERENCE.md section 1).
"""
import math
import numbers
from typing import Callable, Sequence

OFFICIAL_EPOCHS = 100
OFFICIAL_DECAY_EPOCHS = (30, 60, 90)
OFFICIAL_LR_PER_256 = 0.1


def scaled_lr(global_batch_size: int, lr_per_256: float = OFFICIAL_LR_PER_256) -> float:
    """The linear scaling rule: 0.1 for 256 images, 0.0125 for 32 (the seed's value)."""
    return lr_per_256 * global_batch_size / 256.0


def scaled_boundaries(epochs: float, decay_epochs: Sequence[float] = OFFICIAL_DECAY_EPOCHS,
                      reference_epochs: float = OFFICIAL_EPOCHS) -> list:
    """Decay epochs of the 100-epoch recipe stretched to a run of ``epochs`` epochs."""
    return [e * epochs / reference_epochs for e in decay_epochs]


def _is_tensor(step) -> bool:
    # Python and numpy numbers take the plain-math path (no TensorFlow import needed).
    return not isinstance(step, numbers.Number)


def _warmup(step, lr, base_lr: float, warmup_steps: int):
    """Linear warmup from base_lr / warmup_steps to base_lr over warmup_steps steps."""
    if warmup_steps <= 0:
        return lr
    ramp = base_lr * (step + 1) / warmup_steps
    if _is_tensor(step):
        import tensorflow as tf

        return tf.where(step < warmup_steps, ramp, lr)
    return ramp if step < warmup_steps else lr


def piecewise(step, base_lr: float, boundaries: Sequence[int], decay: float = 0.1, warmup_steps: int = 0):
    """base_lr * decay**k, where k is the number of boundaries (in steps) already passed."""
    if _is_tensor(step):
        import tensorflow as tf

        step = tf.cast(step, tf.float32)
        passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in boundaries]) if boundaries else 0.0
        lr = base_lr * tf.pow(decay, passed)
    else:
        lr = base_lr * decay ** sum(1 for b in boundaries if step >= b)
    return _warmup(step, lr, base_lr, warmup_steps)


def cosine(step, base_lr: float, total_steps: int, warmup_steps: int = 0, final_lr: float = 0.0):
    """Cosine decay from base_lr (after the warmup) to final_lr at total_steps."""
    span = max(1, total_steps - warmup_steps)
    if _is_tensor(step):
        import tensorflow as tf

        step = tf.cast(step, tf.float32)
        progress = tf.clip_by_value((step - warmup_steps) / span, 0.0, 1.0)
        lr = final_lr + 0.5 * (base_lr - final_lr) * (1.0 + tf.cos(math.pi * progress))
    else:
        progress = min(1.0, max(0.0, (step - warmup_steps) / span))
        lr = final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))
    return _warmup(step, lr, base_lr, warmup_steps)


def make_schedule(name: str, base_lr: float, total_steps: int, steps_per_epoch: float,
                  decay_epochs: Sequence[float] = (), warmup_epochs: float = 0.0, decay: float = 0.1
                  ) -> Callable:
    """A one-argument function step -> lr for the schedule ``name`` ('piecewise' | 'cosine')."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if name == "piecewise":
        boundaries = [int(round(e * steps_per_epoch)) for e in decay_epochs]
        return lambda step: piecewise(step, base_lr, boundaries, decay, warmup_steps)
    if name == "cosine":
        return lambda step: cosine(step, base_lr, total_steps, warmup_steps)
    raise ValueError("unknown lr schedule %r; choose piecewise or cosine" % name)

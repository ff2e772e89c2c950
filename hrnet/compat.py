"""Everything that differs between the Keras versions hrnet runs under.

- TF 2.6.5 + Keras 2.6 inside the Ascend image (the CANN TF adapter pins it), Python 3.9;
- TF 2.21 + Keras 3 everywhere else;
- TF 2.21 + legacy Keras 2 (``tf-keras`` installed, ``TF_USE_LEGACY_KERAS=1``), which CI
  uses to stand in for the Ascend image's Keras 2.

Other modules use ``from hrnet.compat import keras`` and the helpers below, never
``if keras 3`` checks of their own.
"""
import tensorflow as tf

keras = tf.keras
KERAS_VERSION = tuple(int(p) for p in keras.__version__.split(".")[:2])
KERAS3 = KERAS_VERSION[0] >= 3


def weight_name(variable) -> str:
    """Short name of a layer weight: 'kernel', 'gamma', 'moving_mean', ...

    Keras 3 names a variable 'kernel' (its path is 'layer/kernel'); Keras 2 names it
    'layer/kernel:0' (or 'model/layer/kernel:0').
    """
    return variable.name.split("/")[-1].split(":")[0]


def tf_variable(variable):
    """The tf.Variable behind a Keras weight (Keras 3 wraps it in a KerasVariable)."""
    return getattr(variable, "value", variable) if KERAS3 else variable


def set_mixed_precision(policy: str) -> None:
    """'float32', 'mixed_float16' or 'mixed_bfloat16' as the global Keras policy."""
    keras.mixed_precision.set_global_policy(policy)


def make_sgd(learning_rate, momentum: float, nesterov: bool):
    """SGD with momentum; on Keras 2.6+ and 3 the same class and arguments."""
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)

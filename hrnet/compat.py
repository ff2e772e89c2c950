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


def _keras_version() -> str:
    # tf.keras has __version__ under Keras 3 and TF 2.6, but not as tf-keras's API module.
    version = getattr(keras, "__version__", None)
    if version is None:
        import tf_keras

        version = tf_keras.__version__
    return version


KERAS_VERSION = tuple(int(p) for p in _keras_version().split(".")[:2])
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


# Loss scaling (float16 training). Keras 2: get_scaled_loss / get_unscaled_gradients, and
# apply_gradients takes unscaled gradients. Keras 3: scale_loss, and apply_gradients unscales.
def scale_loss(optimizer, loss):
    return optimizer.scale_loss(loss) if KERAS3 else optimizer.get_scaled_loss(loss)


def unscale_gradients(optimizer, grads):
    """The gradients apply_gradients expects from gradients of a scaled loss."""
    return list(grads) if KERAS3 else optimizer.get_unscaled_gradients(grads)


def loss_scale_value(optimizer) -> float:
    return float(optimizer.dynamic_scale if KERAS3 else optimizer.loss_scale)


def build_optimizer(optimizer, variables) -> None:
    """Create the optimizer's slot variables now: Keras 3 restores a checkpoint only into
    variables that exist (and scales losses only once built); Keras 2 creates them on the
    first apply_gradients and restores them then."""
    if KERAS3:
        optimizer.build(variables)


def data_options(deterministic: bool, private_threadpool_size: int = 0):
    """tf.data.Options; TF 2.6 spells some of them ``experimental_*``."""
    options = tf.data.Options()
    if hasattr(options, "deterministic"):
        options.deterministic = deterministic
    else:
        options.experimental_deterministic = deterministic
    if private_threadpool_size:
        threading = options.threading if hasattr(options, "threading") else options.experimental_threading
        threading.private_threadpool_size = private_threadpool_size
    return options

"""HRNet inference and training throughput on the current device.

    python benchmarks/model_throughput.py --model w18 --batch 32 --size 224

Prints images/s for inference (as built, and with BN folded into the convs by
hrnet.model.fold_batch_norm) and for a training step (forward, backward, SGD update),
each as a tf.function with and without XLA jit compilation, on synthetic data already
on the device (so the input pipeline is not measured; see input_throughput.py).
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hrnet  # noqa: E402, F401, I001  (before TensorFlow: it turns oneDNN on, as for `hrnet train`)
import tensorflow as tf  # noqa: E402
from sides import best_seconds  # noqa: E402

from hrnet.compat import keras, make_sgd, scale_loss, set_mixed_precision, unscale_gradients  # noqa: E402
from hrnet.model import build_model, fold_batch_norm  # noqa: E402

POLICIES = {"fp32": "float32", "mixed_fp16": "mixed_float16", "bf16": "mixed_bfloat16"}


def _time(fn, warmup: int, iters: int, rounds: int = 1) -> float:
    """Seconds per call (tracing and XLA compilation stay in the warm-up)."""
    return best_seconds(fn, warmup, iters, rounds, sync=_sync)


def _sync(out) -> None:
    # Device work is asynchronous: reading a value back waits for it.
    float(tf.reduce_sum(tf.cast(tf.nest.flatten(out)[0], tf.float32)))


def measure(model_name: str, batch: int, size: int, precision: str, jit: bool, warmup: int, iters: int,
            rounds: int = 1):
    set_mixed_precision(POLICIES[precision])
    model = build_model(model_name, num_classes=1000, input_size=(size, size))
    optimizer = make_sgd(0.01, 0.9, True)
    if precision == "mixed_fp16":
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    images = tf.random.uniform((batch, size, size, 3))
    labels = tf.random.uniform((batch,), maxval=1000, dtype=tf.int32)

    @tf.function(jit_compile=jit)
    def infer():
        return model(images, training=False)

    @tf.function(jit_compile=jit)
    def train_step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
            scaled = scale_loss(optimizer, loss) if precision == "mixed_fp16" else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        if precision == "mixed_fp16":
            grads = unscale_gradients(optimizer, grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    timed = dict(warmup=warmup, iters=iters, rounds=rounds)
    inference, training = batch / _time(infer, **timed), batch / _time(train_step, **timed)
    folded = fold_batch_norm(model, model_name)

    @tf.function(jit_compile=jit)
    def infer_folded():
        return folded(images, training=False)

    return inference, training, batch / _time(infer_folded, **timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="w18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--precision", choices=sorted(POLICIES), default="fp32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-xla", action="store_true", help="skip the XLA jit variant")
    args = p.parse_args()

    gpus = tf.config.list_physical_devices("GPU")
    device = "GPU x%d (%s)" % (len(gpus), tf.config.experimental.get_device_details(gpus[0]).get(
        "device_name", "?")) if gpus else "CPU (%d cores)" % os.cpu_count()
    print("hrnet_%s batch %d %dx%d %s on %s, TF %s" % (
        args.model, args.batch, args.size, args.size, args.precision, device, tf.__version__))
    for jit in ([False] if args.no_xla else [False, True]):
        infer, train, folded = measure(args.model, args.batch, args.size, args.precision, jit, args.warmup,
                                       args.iters)
        print("%-22s inference %9.1f img/s (BN folded: %.1f)   training %9.1f img/s" % (
            "tf.function" + (" + XLA jit" if jit else ""), infer, folded, train))


if __name__ == "__main__":
    main()

"""HRNet throughput through standalone Keras 3 on any backend (jax, tensorflow, torch).

    KERAS_BACKEND=jax python benchmarks/model_throughput_keras3.py --model w18 --batch 256

For machines whose Python has no TensorFlow (a GPU box with JAX, say): it builds the very
same layer graph as ``hrnet.model.build_model`` by handing hrnet's model module the
standalone ``keras`` package in place of ``tf.keras``, then times jit-compiled inference
(predict_on_batch) and training steps (train_on_batch: forward, backward, SGD) per
precision, and checks under each precision that a short training run on one fixed batch
lowers the loss with finite values. It measures the model, not hrnet's TF training loop
(model_throughput.py does that where TensorFlow is installed).
"""
import argparse
import os
import sys
import time
import types

import keras
import numpy as np

# hrnet.compat imports TensorFlow; the model code needs only `keras` from it.
sys.modules["hrnet.compat"] = types.SimpleNamespace(keras=keras)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hrnet.model.hrnet import build_model  # noqa: E402

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def measure(args, precision: str):
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    model = build_model(args.model, num_classes=1000, input_size=(args.size, args.size))
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    if precision == "fp16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=not args.no_jit)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32)
    labels = rng.integers(0, 1000, args.batch).astype(np.int32)

    def timed(step):
        for _ in range(args.warmup):
            np.asarray(step())
        start = time.perf_counter()
        for _ in range(args.iters):
            out = step()
        np.asarray(out)  # waits for the device
        return args.batch * args.iters / (time.perf_counter() - start)

    infer = timed(lambda: model.predict_on_batch(images))
    train = timed(lambda: model.train_on_batch(images, labels))
    # Learn one fixed batch: loss must fall and stay finite under this precision.
    small_x, small_y = images[:16], labels[:16] % 10
    first = float(model.train_on_batch(small_x, small_y))
    for _ in range(30):
        last = float(model.train_on_batch(small_x, small_y))
    logits_dtype = str(model.predict_on_batch(small_x).dtype)
    return infer, train, first, last, logits_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="w18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--precision", nargs="+", choices=sorted(POLICIES), default=["fp32", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-jit", action="store_true", help="run eagerly (no XLA / torch.compile start-up)")
    args = p.parse_args()
    print("hrnet_%s batch %d %dx%d, Keras %s on %s" % (
        args.model, args.batch, args.size, args.size, keras.__version__, keras.backend.backend()))
    for precision in args.precision:
        infer, train, first, last, dtype = measure(args, precision)
        ok = np.isfinite(last) and last < first
        print("%-5s inference %9.1f img/s  training %9.1f img/s  | fixed-batch loss %.3f -> %.3f %s, logits %s" % (
            precision, infer, train, first, last, "ok" if ok else "NOT LEARNING", dtype))


if __name__ == "__main__":
    main()

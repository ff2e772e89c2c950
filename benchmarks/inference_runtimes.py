"""Inference speed of what is served, side by side in one run on this CPU: the export's
SavedModel (TensorFlow), its model.onnx under ONNX Runtime, and timm's HRNet (PyTorch).

    python benchmarks/inference_runtimes.py [--model w18] [--batch 1 32] [--size 224]

Set up first, not timed: timm's ``hrnet_<model>`` with its random initialisation, saved as a
state_dict, imported (``hrnet import-weights``) and exported (``hrnet export``, with ONNX), as a
user would: the three sides run the same weights. Each side runs in its own process with the
same protocol as model_vs_timm.py: random images already in memory in the side's layout
(NHWC for ours, NCHW channels_last for timm), warm-up calls, then the best of --rounds means of
--iters calls. Printed: img/s of each side per batch size and each against timm. Which of the
first two ``hrnet serve`` uses is measured where it runs (hrnet.serving.runtimes); this shows
why it cannot be fixed in advance.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from sides import best_seconds, machine, run_side

SIDES = ("savedmodel", "onnxruntime", "timm")


def timm_name(model: str) -> str:
    return "hrnet_w18_small" if model == "w18_small_v1" else f"hrnet_{model}"


def side(name: str, export: str, model: str, batch: int, size: int, warmup: int, iters: int, rounds: int) -> float:
    """img/s of one side."""
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    if name == "timm":
        import timm
        import torch

        net = timm.create_model(timm_name(model), num_classes=1000).eval().to(memory_format=torch.channels_last)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

        def call():
            with torch.inference_mode():
                return net(x)
    elif name == "onnxruntime":
        from hrnet.serving.runtimes import onnx_logits

        logits = onnx_logits(os.path.join(export, "model.onnx"))

        def call():
            return logits(images)
    else:
        import hrnet  # noqa: F401, I001  (oneDNN on, as for `hrnet serve`)
        import tensorflow as tf

        signature = tf.saved_model.load(os.path.join(export, "1")).signatures["serving_default"]
        x = tf.constant(images)

        def call():
            return signature(images=x)["logits"].numpy()
    return batch / best_seconds(call, warmup, iters, rounds)


def make_export(tmp: str, model: str, size: int) -> str:
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model(timm_name(model), num_classes=1000).state_dict(), os.path.join(tmp, "timm.pth"))
    for args in (["import-weights", "--model", model, "--torch-checkpoint", os.path.join(tmp, "timm.pth"),
                  "--output", os.path.join(tmp, "weights")],
                 ["export", "--checkpoint", os.path.join(tmp, "weights"), "--out", os.path.join(tmp, "export")]):
        done = subprocess.run([sys.executable, "-m", "hrnet", *args], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"hrnet {args[0]} failed: {done.stderr.strip().splitlines()[-1]}")
    with open(os.path.join(tmp, "export", "manifest.json")) as f:
        manifest = json.load(f)
    if manifest["image_size"] != size or "onnx" not in manifest:
        raise SystemExit(f"the export is {manifest['image_size']}px, onnx: {manifest.get('onnx_skipped', 'yes')}")
    return os.path.join(tmp, "export")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="w18")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--size", type=int, default=224, help="the size the model config trains at")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.export, args.model, args.batch[0], args.size, args.warmup, args.iters,
                              args.rounds)))
        return
    print(f"hrnet_{args.model} inference, fp32, {args.size}x{args.size} on {machine()}; {args.warmup} warm-up calls, "
          f"then the best of {args.rounds} round(s) of {args.iters} timed calls per figure")
    with tempfile.TemporaryDirectory() as tmp:
        export = make_export(tmp, args.model, args.size)
        for batch in args.batch:
            side_args = ["--model", args.model, "--batch", str(batch), "--size", str(args.size), "--export", export,
                         "--warmup", str(args.warmup), "--iters", str(args.iters), "--rounds", str(args.rounds)]
            figures = {name: run_side(__file__, name, side_args) for name in SIDES}
            print(f"batch {batch:3d}  " + "   ".join(f"{name} {figures[name]:7.1f} img/s" for name in SIDES)
                  + "   against timm: " + ", ".join(f"{name} {figures[name] / figures['timm']:.2f}x"
                                                   for name in SIDES[:2]))


if __name__ == "__main__":
    main()

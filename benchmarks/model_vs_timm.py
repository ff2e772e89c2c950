"""HRNet throughput side by side with timm's on the same machine, in one run.

    python benchmarks/model_vs_timm.py --model w18 --batch 32 --size 224 --precision fp32 bf16

Each side runs in its own process, one after the other, with the same protocol: synthetic
data already in memory, warm-up calls, then timed calls of inference and of a training step
(forward, backward, SGD momentum 0.9 nesterov): each figure the best of --rounds means of
--iters calls, so that a burst of the machine's other load counts against neither side.
Ours: model_throughput.measure (tf.function, no XLA; bf16 = Keras' mixed_bfloat16 policy),
inference also with BN folded into the convs (hrnet.model.fold_batch_norm; timm's figure
for it is timm's model as it is). timm: ``timm.create_model("hrnet_<model>")`` in PyTorch,
channels_last, bf16 = ``torch.autocast("cpu", torch.bfloat16)``. Needs the torch extra
(timm). Prints the CPU, img/s of both and the ratio ours / timm.
"""
import argparse
import json
import os
import sys

from sides import best_seconds, machine, run_side

HERE = os.path.dirname(os.path.abspath(__file__))


def ours(model: str, batch: int, size: int, precision: str, warmup: int, iters: int, rounds: int) -> dict:
    sys.path.insert(0, HERE)
    from model_throughput import measure

    infer, train, folded = measure(model, batch, size, precision, False, warmup, iters, rounds)
    return {"inference": infer, "inference, BN folded": folded, "training": train}


def timm_side(model: str, batch: int, size: int, precision: str, warmup: int, iters: int, rounds: int) -> dict:
    import timm
    import torch

    name = "hrnet_w18_small" if model == "w18_small_v1" else f"hrnet_{model}"  # timm's name of v1
    net = timm.create_model(name, num_classes=1000).to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, size, size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def infer():
        with torch.inference_mode(), autocast:
            return net(images)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    def seconds(fn, train):
        net.train(train)
        return best_seconds(fn, warmup, iters, rounds)

    return {"inference": batch / seconds(infer, False), "training": batch / seconds(train_step, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="w18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1, help="figure = the best of this many rounds of --iters calls")
    p.add_argument("--side", choices=("ours", "timm"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        fn = ours if args.side == "ours" else timm_side
        print(json.dumps(fn(args.model, args.batch, args.size, args.precision[0], args.warmup, args.iters,
                            args.rounds)))
        return
    print(f"hrnet_{args.model} batch {args.batch} {args.size}x{args.size} on {machine()}; {args.warmup} warm-up "
          f"calls, then the best of {args.rounds} round(s) of {args.iters} timed calls per figure")
    for precision in args.precision:
        side_args = ["--model", args.model, "--batch", str(args.batch), "--size", str(args.size),
                     "--precision", precision, "--warmup", str(args.warmup), "--iters", str(args.iters),
                     "--rounds", str(args.rounds)]
        figures = {side: run_side(__file__, side, side_args) for side in ("ours", "timm")}
        for what in ("inference", "inference, BN folded", "training"):
            a, b = figures["ours"][what], figures["timm"][what.split(",")[0]]  # timm as it is, unfolded
            print(f"{precision:5s} {what:20s}  ours {a:8.1f} img/s   timm {b:8.1f} img/s   ratio {a / b:5.2f}x")


if __name__ == "__main__":
    main()

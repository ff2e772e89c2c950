"""Training input from object storage, staged whole against streamed (hrnet.data.stream),
side by side in one run, on data sets of growing size in a local SeaweedFS.

    python benchmarks/stream_startup.py --shards 64 256 1024 --per-shard 4 --cache-shards 40

Each data set: photo-sized JPEGs (500x375, ~110 KB; benchmarks/convert_throughput.py)
converted into N train shards of ``--per-shard`` images, uploaded once. For each, in fresh
processes with empty caches:
- staged: what train did before streaming (data_cache_gb 0): download and hash the split,
  then build the input; streamed: the manifest only, then the shards as they are read, at
  most ``--cache-shards`` shards' bytes on disk;
- time to the first batch (the first step's input), and peak local disk;
- on the first size, the steady rate (images/s over two epochs after the first batch) of
  both, and their ratio: for the input alone, and with a device step per batch emulated by a
  sleep (``--step-ms``: the accelerator computes while the host's cores feed the input), where
  streaming must hide its fetches.

The goal: streamed time to first batch constant in N, peak disk at most the bound, steady
rate at least 0.95 of staged. The figures depend on the store's bandwidth: here it is on
the same machine, which favours staging (a real store is slower, and staging grows with it).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test S3 servers

from convert_throughput import make_photos  # noqa: E402
from sides import machine, run_side  # noqa: E402

BATCH, SIZE = 32, 224
CORES = len(os.sched_getaffinity(0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (the store, on this same machine)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side(args) -> dict:
    """One measurement in this process (fresh caches): time to the first batch, peak disk,
    and with --steady the rate over two epochs after it."""
    from hrnet import data
    from hrnet.data import stream
    from hrnet.data.reference import stage_or_stream

    cache = os.environ["HRNET_CACHE_DIR"]
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            total = 0
            for root, _, files in os.walk(cache):
                for name in files:
                    try:
                        total += os.path.getsize(os.path.join(root, name))
                    except OSError:
                        pass
            peak[0] = max(peak[0], total)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    streamed = args.side == "streamed"
    folder, remote = stage_or_stream(args.uri, ("train",), verify=True, stream=streamed)
    info = data.dataset_info(folder, splits=("train",), remote=remote, verify=not remote)
    largest = max(s["bytes"] for s in info.manifest["shards"]["train"])
    dataset = data.train_dataset(info, BATCH, SIZE, seed=1, shuffle_buffer=256,
                                 data_cache=args.cache_shards * largest if streamed else 0)
    iterator = iter(dataset)
    next(iterator)
    first = time.perf_counter() - start
    rates = {}
    if args.steady:
        # Input alone (the host's cores do nothing else), then with an accelerator's step
        # (a sleep: the device computes while the host's cores are free for the input).
        for step_s in (0.0, args.step_ms / 1000):
            batches = 2 * info.counts["train"] // BATCH
            t0 = time.perf_counter()
            for _ in range(batches):
                next(iterator)
                time.sleep(step_s)
            rates[step_s] = batches * BATCH / (time.perf_counter() - t0)
    stop.set()
    sampler.join()
    fetched = stream._open[-1].fetched if streamed and stream._open else None
    return {"first_batch_s": first, "peak_disk": peak[0], "rates": list(rates.values()), "fetched": fetched,
            "bound": args.cache_shards * largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--per-shard", type=int, default=4, help="images per shard")
    parser.add_argument("--cache-shards", type=int, default=40, help="the stream's bound, in shards")
    parser.add_argument("--side", choices=("staged", "streamed"))
    parser.add_argument("--uri")
    parser.add_argument("--steady", action="store_true")
    parser.add_argument("--step-ms", type=float, default=100.0,
                        help="the emulated device step per batch of 32 (default: the seed's one Ascend 910, "
                             "324.63 images/s at batch 32, ~99 ms a step)")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return

    from s3server import SeaweedProcess, env_for, make_bucket

    from hrnet import storage
    from hrnet.data.convert import convert_dataset

    work = tempfile.mkdtemp(prefix="hrnet-stream-bench-")
    weed = SeaweedProcess()
    server = weed.start()
    try:
        os.environ.update(env_for(server, os.path.join(work, "cache"), HRNET_S3_WORKERS="8"))
        bucket = make_bucket(server)
        print(f"{machine()}; SeaweedFS on this machine; batch {BATCH} at {SIZE}x{SIZE}, bound "
              f"{args.cache_shards} shards")
        print(f"{'shards':>7} {'GB':>6} | {'first batch staged':>18} {'streamed':>9} | "
              f"{'peak disk staged':>16} {'streamed':>9} {'bound':>7}")
        for i, n in enumerate(args.shards):
            images = n * args.per_shard
            src, records = os.path.join(work, f"src{n}"), os.path.join(work, f"records{n}")
            make_photos(src, images * 10 // 9 + 10)
            convert_dataset(src, records, train_shards=n, validation_shards=1, progress=False)
            shutil.rmtree(src)
            uri = f"s3://{bucket}/data{n}"
            storage.upload(records, uri)
            size = sum(os.path.getsize(os.path.join(records, f)) for f in os.listdir(records))
            shutil.rmtree(records)
            results = {}
            for which in ("staged", "streamed"):
                cache = os.path.join(work, f"cache-{which}-{n}")
                os.environ["HRNET_CACHE_DIR"] = cache
                extra = ["--steady"] if i == 0 else []
                before = cpu_seconds(weed.proc.pid)
                results[which] = run_side(__file__, which, ["--uri", uri, "--cache-shards", str(args.cache_shards),
                                                            "--step-ms", str(args.step_ms), *extra])
                results[which]["store_cpu_s"] = cpu_seconds(weed.proc.pid) - before
                shutil.rmtree(cache, ignore_errors=True)
            st, sm = results["staged"], results["streamed"]
            print(f"{n:>7} {size / 1e9:>6.2f} | {st['first_batch_s']:>17.1f}s {sm['first_batch_s']:>8.1f}s | "
                  f"{st['peak_disk'] / 1e6:>14.0f}MB {sm['peak_disk'] / 1e6:>7.0f}MB {sm['bound'] / 1e6:>5.0f}MB",
                  flush=True)
            if i == 0:
                for k, what in enumerate(("input alone", f"with a {args.step_ms:g} ms device step")):
                    a, b = st["rates"][k], sm["rates"][k]
                    print(f"        steady rate, {what}: staged {a:.0f} images/s, streamed {b:.0f} images/s: "
                          f"ratio {b / a:.3f} (goal >= 0.95)", flush=True)
                print(f"        the store on this machine used {st['store_cpu_s']:.1f} / {sm['store_cpu_s']:.1f} "
                      f"CPU-s of the {CORES} cores", flush=True)
    finally:
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

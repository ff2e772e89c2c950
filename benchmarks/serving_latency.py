"""``hrnet serve`` against the same export called in-process, side by side in one run:
requests per second and p50 / p99 latency at batch 1 and 32.

    python benchmarks/serving_latency.py [--model w18] [--image-size 224] [--requests 40 8]

Set up first, not timed: photo-sized JPEGs (500x375, benchmarks/convert_throughput.py), a
checkpoint of ``--model`` after one training step on them (speed does not depend on the
weights) and its export (``hrnet train``, ``hrnet export``, as a user runs them). Then, for each
batch size, the two sides one after the other on the same JPEGs, each request waiting for the
one before (latency, not throughput under concurrency):

- in-process: ``Exported.classify`` (the export's ``classify_bytes`` signature: decode, crop,
  model, top-k) in this process;
- HTTP: ``hrnet serve`` (KServe's ModelServer) in its own process on a loopback port, V1
  requests of base64 JPEGs, the JSON answer parsed.

HTTP overhead: the HTTP side's p50 over the in-process side's, less one; goal under 15% at
batch 32. Both sides share this machine's cores, one at a time.
"""
import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # free_port

from convert_throughput import make_photos  # noqa: E402
from s3server import free_port  # noqa: E402
from sides import machine  # noqa: E402


def hrnet(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "hrnet", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode:
        raise SystemExit(f"hrnet {args[0]} failed: {done.stderr.strip().splitlines()[-1]}")


def make_export(tmp: str, model: str, size: int) -> tuple:
    """(the export's folder, the JPEGs' bytes)."""
    make_photos(os.path.join(tmp, "photos"), 80, classes=8)
    hrnet("convert", "--src", os.path.join(tmp, "photos"), "--out", os.path.join(tmp, "records"), "--workers", "1")
    hrnet("train", "--data", os.path.join(tmp, "records"), "--out", os.path.join(tmp, "run"), "--model", model,
          "--image-size", str(size), "--batch-size", "2", "--train-steps", "1", "--eval-every", "0")
    hrnet("export", "--checkpoint", os.path.join(tmp, "run"), "--out", os.path.join(tmp, "export"), "--no-onnx")
    root = os.path.join(tmp, "photos", "train")
    jpegs = [open(os.path.join(root, c, f), "rb").read() for c in sorted(os.listdir(root))
             for f in sorted(os.listdir(os.path.join(root, c)))]
    return os.path.join(tmp, "export"), jpegs


def timed(call, requests: int) -> list:
    call()  # the first call traces / warms up
    seconds = []
    for _ in range(requests):
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    return seconds


def summary(seconds: list, batch: int) -> dict:
    return {"p50_ms": 1000 * float(np.percentile(seconds, 50)), "p99_ms": 1000 * float(np.percentile(seconds, 99)),
            "requests_per_s": len(seconds) / sum(seconds), "images_per_s": batch * len(seconds) / sum(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="w18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, nargs=2, default=[40, 8], metavar=("BATCH1", "BATCH32"),
                        help="timed requests at batch 1 and at batch 32")
    args = parser.parse_args()
    from hrnet.serving.exported import Exported

    with tempfile.TemporaryDirectory() as tmp:
        export, jpegs = make_export(tmp, args.model, args.image_size)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "hrnet", "serve", "--model", export, "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            local = Exported(export)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                try:
                    with urllib.request.urlopen(url + "/v2/health/ready", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("hrnet serve did not get ready") from None
                    time.sleep(0.5)

            results = {"machine": machine(), "model": args.model, "image_size": args.image_size}
            for batch, requests in zip((1, 32), args.requests):
                images = [jpegs[i % len(jpegs)] for i in range(batch)]
                body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in images]}).encode()

                def over_http(body=body, batch=batch):
                    request = urllib.request.Request(url + "/v1/models/hrnet:predict", body,
                                                     {"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=600) as answer:
                        assert len(json.load(answer)["predictions"]) == batch

                in_process = summary(timed(lambda images=images: local.classify(images), requests), batch)
                http = summary(timed(over_http, requests), batch)
                results[f"batch_{batch}"] = {"in_process": in_process, "http": http,
                                             "http_overhead": http["p50_ms"] / in_process["p50_ms"] - 1}
                print(f"batch {batch:2d}: in-process p50 {in_process['p50_ms']:.1f} ms p99 "
                      f"{in_process['p99_ms']:.1f} ms ({in_process['requests_per_s']:.2f} req/s); hrnet serve p50 "
                      f"{http['p50_ms']:.1f} ms p99 {http['p99_ms']:.1f} ms ({http['requests_per_s']:.2f} req/s); "
                      f"HTTP overhead {100 * results[f'batch_{batch}']['http_overhead']:+.1f}%", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

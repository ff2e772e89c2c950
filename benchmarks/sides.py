"""Run one side of a side-by-side benchmark in its own process: ours (TensorFlow) and the
peer's (PyTorch) never share a process, whose threads and forked workers would collide."""
import json
import os
import platform
import subprocess
import sys
import time


def run_side(script: str, side: str, args) -> dict:
    """``script --side SIDE ARGS...``; returns the JSON object its last output line holds."""
    out = subprocess.run([sys.executable, os.path.abspath(script), "--side", side, *args],
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def best_seconds(fn, warmup: int, iters: int, rounds: int, sync=lambda out: None) -> float:
    """Seconds per call of fn after `warmup` calls: the best of `rounds` means over `iters`
    calls, the round least disturbed by the rest of the machine. sync(last output) waits for
    asynchronous device work (TensorFlow); PyTorch's CPU work is synchronous."""
    for _ in range(warmup):
        out = fn()
    sync(out)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        sync(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def machine() -> str:
    """The CPU the figures were measured on, and its bf16 / matrix extensions."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = info.get("flags", "").split()
    extensions = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU(s), {name}" + (f" ({', '.join(extensions)})" if extensions else "")

"""Run one side of a side-by-side benchmark in its own process: ours (TensorFlow) and the
peer's (PyTorch) never share a process, whose threads and forked workers would collide."""
import json
import os
import subprocess
import sys


def run_side(script: str, side: str, args) -> dict:
    """``script --side SIDE ARGS...``; returns the JSON object its last output line holds."""
    out = subprocess.run([sys.executable, os.path.abspath(script), "--side", side, *args],
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])

"""``hrnet <command> --help`` for every command, each in a fresh interpreter: the seconds it
takes (the best of --rounds), and the slowest. TensorFlow is not imported for help
(tests/test_cli.py checks it); importing it alone takes seconds, which this line would show.

    python benchmarks/cli_help.py [--rounds 3]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hrnet.cli import COMMANDS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    seconds = {}
    for name in COMMANDS:
        best = float("inf")
        for _ in range(args.rounds):
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hrnet", name, "--help"], check=True, stdout=subprocess.DEVNULL)
            best = min(best, time.perf_counter() - began)
        seconds[name] = best
        print(f"hrnet {name} --help: {best:.2f} s", flush=True)
    slowest = max(seconds, key=seconds.get)
    print(f"slowest: hrnet {slowest} --help, {seconds[slowest]:.2f} s (goal under 1 s)")
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()

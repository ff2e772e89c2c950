"""The ``hrnet`` command line itself: every command's ``--help`` without TensorFlow (it takes
seconds to import, and prints its oneDNN lines), and help that says what a flag needs."""
import json
import subprocess
import sys

from hrnet import cli

# Each command's parser built in turn in one fresh interpreter, noting after each whether
# TensorFlow (or torch) came in with it: the first that does is named.
PROBE = r'''
import json, sys
from hrnet import cli
seen = {}
for name in cli.COMMANDS:
    cli.build_parser(name).format_help()
    seen[name] = sorted(m for m in ("tensorflow", "torch", "keras") if m in sys.modules)
print(json.dumps(seen))
'''


def test_every_commands_help_loads_no_tensorflow():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(seen) == list(cli.COMMANDS)
    assert {name: heavy for name, heavy in seen.items() if heavy} == {}


def test_train_help_names_what_is_required_and_no_empty_default():
    text = cli.build_parser("train").format_help()
    assert "(default: )" not in text
    assert " ".join(text.split()).count("required, as a flag or in --config") == 2  # --data and --out

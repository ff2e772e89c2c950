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


def _hrnet(*argv):
    return subprocess.run([sys.executable, "-m", "hrnet", *argv], capture_output=True, text=True, timeout=120)


def test_a_bad_flag_value_is_one_line_not_the_whole_usage():
    done = _hrnet("train", "--data", "x", "--out", "y", "--batch-size", "abc")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["hrnet train: error: argument --batch-size: invalid int value: 'abc' "
                                        "(hrnet train --help lists the options)"]


def test_a_uri_with_one_slash_is_named_as_a_mistyped_uri_not_a_missing_folder(tmp_path):
    done = _hrnet("convert", "--src", "s3:/bucket/images", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("hrnet convert: error: s3:/bucket/images is not a URI: write "
                                                    "s3://bucket/prefix (two slashes)")


# `hrnet export`'s refusals, each in a fresh interpreter that then says whether TensorFlow came in.
EXPORT_PROBE = r'''
import json, sys
from hrnet import cli
code = cli.main(["export", "--checkpoint", sys.argv[1], "--out", sys.argv[2]])
print(json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules}))
'''


def test_export_refuses_a_bad_checkpoint_or_an_occupied_output_before_tensorflow_loads(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "manifest.json").write_text(json.dumps({"kind": "weights", "model": "w18", "num_classes": 10,
                                                       "weights": "weights"}))
    taken = tmp_path / "records"
    taken.mkdir()
    (taken / "manifest.json").write_text(json.dumps({"kind": "tfrecords"}))
    exported = tmp_path / "export"
    exported.mkdir()
    (exported / "manifest.json").write_text(json.dumps({"kind": "export"}))
    for checkpoint, out, words in (
            (tmp_path / "missing", tmp_path / "new", "no such directory: %s" % (tmp_path / "missing")),
            (exported, tmp_path / "new", "holds an export output, not a model"),
            (weights, taken, "already holds a tfrecords output (its manifest.json), not an export: refusing")):
        done = subprocess.run([sys.executable, "-c", EXPORT_PROBE, str(checkpoint), str(out)], capture_output=True,
                              text=True, timeout=120)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result == {"code": 2, "tensorflow": False}, done.stderr[-2000:]
        assert words in done.stderr.strip().splitlines()[-1], done.stderr
    assert not (tmp_path / "new").exists()

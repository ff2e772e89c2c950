"""Every error a user can cause is one line and exit 2, through the CLI's one error path:
bad config values and types, NaN and infinity, malformed YAML, corrupt and truncated
shards (named before step 1, or by shard and record while reading), unfinished
conversions, permissions and full disks."""
import errno
import os

import pytest
from helpers import TINY_CONFIG, write_images

from hrnet import cli


@pytest.fixture(scope="module")
def records(tmp_path_factory):

    from hrnet.data.convert import convert_dataset

    root = tmp_path_factory.mktemp("bad-input")
    write_images(str(root / "images"))
    convert_dataset(str(root / "images"), str(root / "records"), train_shards=2, workers=1, progress=False)
    return root


def run(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse: its one error line (hrnet.cli._Parser)
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("hrnet ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]


def train_args(records, out, *extra):
    return ["train", "--data", records / "records", "--out", out, "--model", TINY_CONFIG, "--image-size", "32",
            "--batch-size", "4", "--train-steps", "2", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--epochs", "inf"], "finite number"),
    (["--lr", "nan"], "finite number"),
    (["--lr", "inf"], "finite number"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--label-smoothing", "1.5"], "label_smoothing"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
])
def test_bad_flag_values(records, tmp_path, capsys, extra, words):
    code, line = run(capsys, *train_args(records, tmp_path / "out", *extra))
    assert code == 2 and words in line, line


@pytest.mark.parametrize("text, words", [
    ("batch_size: [unclosed\n", "is not valid YAML at line"),
    ("batch_size: abc\n", "batch_size must be a whole number"),
    ("lr: .nan\n", "lr must be a finite number"),
    ("flip: maybe\n", "flip must be true or false"),
    ("area_range: 0.5\n", "area_range must be a list"),
    ("- just\n- a list\n", "must be a mapping"),
    ("bacth_size: 4\n", "unknown train config key"),
])
def test_bad_config_files(records, tmp_path, capsys, text, words):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    code, line = run(capsys, *train_args(records, tmp_path / "out", "--config", config))
    assert code == 2 and words in line, line


def copy_records(records, tmp_path):
    import shutil

    dst = tmp_path / "records"
    shutil.copytree(records / "records", dst)
    return dst


def test_a_truncated_shard_is_named_before_step_1(records, tmp_path, capsys):
    data = copy_records(records, tmp_path)
    shard = data / "train-00000-of-00002"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, line = run(capsys, *train_args(tmp_path, tmp_path / "out"))
    assert code == 2 and "train-00000-of-00002" in line and "bytes but manifest.json says" in line, line
    assert not (tmp_path / "out").exists()  # a failed start leaves nothing behind


def test_a_byte_flip_is_found_by_verify_data_and_by_the_reader(records, tmp_path, capsys):
    data = copy_records(records, tmp_path)
    shard = data / "train-00001-of-00002"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, line = run(capsys, *train_args(tmp_path, tmp_path / "out", "--verify-data"))
    assert code == 2 and "train-00001-of-00002 does not match its sha256" in line, line
    # Without the up-front hash, the reader's CRC check stops training and names shard and record.
    code, line = run(capsys, *train_args(tmp_path, tmp_path / "out2", "--train-steps", "20"))
    assert code == 2 and "corrupt training data" in line and "train-00001-of-00002: record" in line, line


def _edit_num_classes(m):
    m["num_classes"] = 2


def _edit_train_count(m):
    m["counts"]["train"] = 100000


def _drop_a_shard(m):  # and the count with it: the manifest agrees with itself
    m["counts"]["train"] -= m["shards"]["train"].pop()["records"]


@pytest.mark.parametrize("edit, words", [
    (_edit_num_classes, "says num_classes 2, but there are 3 classes"),  # label 2 was an all-zero target
    (_edit_train_count, "counts 100000 train records, but its shards hold 24"),  # the schedule followed it
    (_drop_a_shard, "holds train shards that manifest.json does not list (train-00001-of-00002)"),  # half read
])
def test_an_edited_manifest_is_refused_before_step_1(records, tmp_path, capsys, edit, words):
    import json

    data = copy_records(records, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))
    code, line = run(capsys, *train_args(tmp_path, tmp_path / "out"))
    assert code == 2 and words in line, line
    assert not (tmp_path / "out").exists()


def test_an_unfinished_conversion_is_not_taken_for_slim_records(records, tmp_path, capsys):
    data = copy_records(records, tmp_path)
    os.remove(data / "manifest.json")
    code, line = run(capsys, *train_args(tmp_path, tmp_path / "out", "--num-classes", "3", "--label-offset", "0"))
    assert code == 2 and "unfinished `hrnet convert`" in line, line


@pytest.mark.parametrize("number, words", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"),
                                           (errno.EROFS, "read-only")])
def test_the_operating_systems_refusals(records, tmp_path, capsys, monkeypatch, number, words):
    from hrnet.train import config

    def refuse(self, directory):
        raise OSError(number, os.strerror(number), os.path.join(directory, config.CONFIG_FILE))

    monkeypatch.setattr(config.TrainConfig, "save", refuse)
    code, line = run(capsys, *train_args(records, tmp_path / "out"))
    assert code == 2 and words in line and "train_config.yaml" in line, line


def test_run_local_refuses_nan(capsys):
    from pipelines.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["run-local", "--lr", "nan"])
    assert e.value.code == 2 and "finite number" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [(["--model", "nope"], "unknown HRNet model 'nope'"),
                                          (["--devices", "3"], "devices"),
                                          (["--deploy-name", "Not_A_Name"], "name 'Not_A_Name' must be a DNS label"),
                                          (["--data-uri", "/no/such/data"], "--data-uri /no/such/data: no such file"),
                                          (["--data-uri", "gs://b/x"], "data_uri 'gs://b/x' is neither")])
def test_run_local_refuses_a_bad_parameter_in_one_line_before_the_pipeline_starts(tmp_path, capsys, flags, words):
    from pipelines.__main__ import main

    code = main(["run-local", "--workdir", str(tmp_path / "w"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "w").exists()  # nothing written: not even the demo data


def test_an_unreadable_class_folder_is_named_not_called_empty(tmp_path, capsys, monkeypatch):
    """(The tests run as root, whom file modes do not stop: the permission check is faked.)"""

    from hrnet.data import convert

    write_images(str(tmp_path / "images"))
    locked = str(tmp_path / "images" / "train" / "class1")
    real_access = os.access
    monkeypatch.setattr(convert.os, "access", lambda p, mode: p != locked and real_access(p, mode))
    code, line = run(capsys, "convert", "--src", tmp_path / "images", "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "cannot read the class folder" in line and "class1" in line and "permission" in line, line


@pytest.mark.parametrize("argv, words", [
    (["train", "--lr-decay", "-5"], "lr_decay must be > 0"),  # trained at a negative lr before
    (["convert", "--workers", "-2"], "workers must be at least 1"),
    (["convert", "--train-shards", "0"], "train_shards must be at least 1"),
    (["convert", "--quality", "500"], "quality must be 1 to 100"),
    (["launch", "--grace-period", "-5", "--", "true"], "--grace-period must be 0 or more"),
])
def test_values_that_cannot_run_are_refused(records, tmp_path, capsys, argv, words):
    if argv[0] == "train":
        argv = train_args(records, tmp_path / "out", *argv[1:])
    elif argv[0] == "convert":
        argv = ["convert", "--src", records / "images", "--out", tmp_path / "out", "--no-progress", *argv[1:]]
    code, line = run(capsys, *argv)
    assert code == 2 and words in line, line
    assert not (tmp_path / "out").exists()


def test_a_train_split_that_is_a_file_is_refused(tmp_path, capsys):
    """It was taken for no train split at all: the data set silently had validation only."""
    import shutil

    src = tmp_path / "tree"
    write_images(str(src))
    shutil.rmtree(src / "train")
    (src / "train").write_text("not a folder")
    code, line = run(capsys, "convert", "--src", src, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "train is a file, not a folder of class folders" in line, line


def test_files_of_the_wrong_kind_are_named_in_one_line(records, tmp_path, capsys):
    """Each was a traceback: --config naming a folder, --model naming a YAML file that is not
    valid YAML, and an --out that is an existing file (every writing command)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [\n")
    code, line = run(capsys, *train_args(records, tmp_path / "out", "--config", tmp_path))
    assert code == 2 and "is a folder, not a train config file" in line, line
    code, line = run(capsys, "info", "--model", broken)
    assert code == 2 and "broken.yaml is not valid YAML at line 2" in line, line
    a_file = tmp_path / "a-file"
    a_file.write_text("someone's notes")
    code, line = run(capsys, "convert", "--src", records / "images", "--out", a_file, "--no-progress")
    assert code == 2 and "a-file is a file, not a folder" in line, line
    assert a_file.read_text() == "someone's notes"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_an_invalid_manifest_is_named(records, tmp_path, capsys, text):
    """It was reported as a bare JSON error, without the file."""
    data = copy_records(records, tmp_path)
    (data / "manifest.json").write_bytes(text.encode("latin-1"))
    code, line = run(capsys, *train_args(tmp_path, tmp_path / "out"))
    assert code == 2 and str(data / "manifest.json") + " is not a valid manifest" in line, line

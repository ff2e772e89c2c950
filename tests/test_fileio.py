"""hrnet.fileio: a file is replaced whole or not at all."""
import hashlib
import os

import pytest

from hrnet.fileio import PARTIAL_SUFFIX, atomic_write, file_digest, replacing


def test_atomic_write_replaces_text_and_bytes(tmp_path):
    path = str(tmp_path / "config.yaml")
    assert atomic_write(path, "model: w18\n") == path
    assert open(path, encoding="utf-8").read() == "model: w18\n"
    atomic_write(path, b"\x00\x01")
    assert open(path, "rb").read() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    path = str(tmp_path / "rank_table.json")
    atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            assert tmp == path + PARTIAL_SUFFIX
            with open(tmp, "w") as f:
                f.write("half of the n")
            raise RuntimeError("killed")
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["rank_table.json"]


def test_file_digest_matches_hashlib(tmp_path):
    data = os.urandom((1 << 20) + 17)  # more than one block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_digest(str(path)) == hashlib.sha256(data).hexdigest()
    assert file_digest(str(path), "md5") == hashlib.md5(data).hexdigest()

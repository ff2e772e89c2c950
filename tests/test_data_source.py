"""The pipeline's one data parameter: the prepare-data step finds whether ``data_uri`` holds
TFRecords (referred to as they are) or an image tree (converted), in a folder and in a real
S3 store (SeaweedFS)."""
import json
import os
import shutil

import pytest
from helpers import write_jpeg_tree

from hrnet import storage
from hrnet.data.reference import REFERENCE, holds_records, prepare
from hrnet.errors import HrnetError
from hrnet.manifest import MANIFEST


@pytest.fixture
def slim_records(digits, tmp_path):
    """The digits' shards as slim's script leaves them: no manifest.json, no labels.txt."""
    folder = tmp_path / "slim"
    folder.mkdir()
    for name in os.listdir(digits.records):
        if name.startswith(("train-", "validation-")):
            shutil.copy(digits.records / name, folder / name)
    return folder


def read_reference(folder):
    with open(os.path.join(folder, REFERENCE)) as f:
        return json.load(f)


def test_records_are_referred_to_as_they_are(digits, slim_records, tmp_path):
    for records in (digits.records, slim_records):
        assert holds_records(str(records))
        out = tmp_path / f"ref-{records.name}"
        out.mkdir()
        assert prepare(str(records), str(out), str(tmp_path / "artifact")) == {"records": str(records)}
        assert read_reference(out)["uri"] == str(records)
    assert not (tmp_path / "tfrecords").exists()  # nothing converted, nothing copied


def test_an_image_tree_is_converted_beside_the_artifact_or_at_datasets_uri(tmp_path):
    tree = write_jpeg_tree(tmp_path / "tree", {"train": [3, 3], "validation": [1, 1]})  # ImageNet's split folders
    assert not holds_records(tree)
    out = tmp_path / "dataset"
    out.mkdir()
    shown = prepare(tree, str(out), str(tmp_path / "step" / "dataset"))
    records = str(tmp_path / "step" / "tfrecords")
    assert shown["records"] == records and shown["num_classes"] == 2 and shown["counts"] == {"train": 6,
                                                                                             "validation": 2}
    assert read_reference(out)["uri"] == records and holds_records(records)
    chosen = str(tmp_path / "datasets" / "tree")
    assert prepare(tree, str(out), str(tmp_path / "step" / "dataset"), datasets_uri=chosen)["records"] == chosen
    assert read_reference(out)["uri"] == chosen


def test_the_demo_tree_with_its_manifest_is_an_image_tree(digits):
    assert not holds_records(str(digits.jpeg))


@pytest.mark.parametrize("content, message", [
    (None, "there is nothing there"),
    ({}, "there is nothing there"),
    ({MANIFEST: {"kind": "checkpoint"}}, "holds a 'checkpoint' output, neither TFRecords nor an image tree"),
])
def test_what_is_neither_is_named(tmp_path, content, message):
    where = tmp_path / "data"
    if content is not None:
        where.mkdir()
        for name, body in content.items():
            (where / name).write_text(json.dumps(body))
    with pytest.raises(HrnetError, match=message):
        prepare(str(where), str(tmp_path), str(tmp_path / "artifact"))
    assert not (tmp_path / REFERENCE).exists()


def test_records_on_the_data_volume_are_refused_where_the_steps_do_not_share_it(digits, tmp_path):
    """A pipeline root in object storage: the train pod would not find /data/... ."""
    with pytest.raises(HrnetError, match="only the prepare-data step mounts"):
        prepare(str(digits.records), str(tmp_path), "s3://mlpipeline/v2/artifacts/run/prepare-data/dataset")
    assert not (tmp_path / REFERENCE).exists()


def test_in_object_storage_only_the_top_level_is_listed(s3_env, digits, slim_records, tmp_path):
    tree = write_jpeg_tree(tmp_path / "tree", {"train": [2, 2], "validation": [1, 1]})
    storage.upload(tree, s3_env.uri("tree"))
    storage.upload(str(digits.records), s3_env.uri("ours"))
    storage.upload(str(slim_records), s3_env.uri("slim"))
    assert storage.list_names(s3_env.uri("tree")) == ["train", "validation"]
    assert storage.list_names(s3_env.uri()) == ["ours", "slim", "tree"]
    assert not holds_records(s3_env.uri("tree"))
    assert holds_records(s3_env.uri("ours")) and holds_records(s3_env.uri("slim"))
    with pytest.raises(HrnetError, match="there is nothing there"):
        holds_records(s3_env.uri("nothing"))
    out = tmp_path / "dataset"
    out.mkdir()
    assert prepare(s3_env.uri("slim"), str(out), s3_env.uri("run/dataset")) == {"records": s3_env.uri("slim")}
    shown = prepare(s3_env.uri("tree"), str(out), s3_env.uri("run/dataset"))
    assert shown["records"] == s3_env.uri("run/tfrecords") and shown["num_classes"] == 2
    assert holds_records(s3_env.uri("run/tfrecords"))

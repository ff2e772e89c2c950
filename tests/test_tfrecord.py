"""hrnet.data.tfrecord against TensorFlow itself: the Examples and the files it writes are
byte for byte TensorFlow's, TensorFlow reads them, and the converter's workers that use it
never import TensorFlow."""
import hashlib
import io
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from hrnet.data import schema, tfrecord


def tf_example(encoded, filename, label, synset, text, height, width, boxes=()):
    """What the converter wrote before hrnet.data.tfrecord: slim's keys through TensorFlow's
    own Example, serialized deterministically."""
    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(vs):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(vs)))

    def f(vs):
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(vs)))

    feature = {
        schema.HEIGHT: i([height]), schema.WIDTH: i([width]), schema.COLORSPACE: b(b"RGB"),
        schema.CHANNELS: i([3]), schema.LABEL: i([label]), schema.SYNSET: b(synset.encode()),
        schema.TEXT: b(text.encode()), schema.BBOX_XMIN: f(x[0] for x in boxes),
        schema.BBOX_YMIN: f(x[1] for x in boxes), schema.BBOX_XMAX: f(x[2] for x in boxes),
        schema.BBOX_YMAX: f(x[3] for x in boxes), schema.BBOX_LABEL: i([label] * len(boxes)),
        schema.FORMAT: b(b"JPEG"), schema.FILENAME: b(filename.encode()), schema.ENCODED: b(encoded),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


CASES = [
    # (encoded, filename, label, synset, text, height, width, boxes)
    (b"\xff\xd8tiny\xff\xd9", "a.JPEG", 0, "n01440764", "tench, Tinca tinca", 1, 1, []),
    (os.urandom(200_000), "n01440764_10026.JPEG", 1000, "n15075141", "toilet tissue", 375, 500,
     [(0.1, 0.2, 0.9, 0.8), (0.0, 0.0, 1.0, 1.0), (1 / 3, 0.25, 0.5, 2 / 3)]),
    (b"", "", 127, "", "", 128, 16383, [(0.5, 0.5, 0.5, 0.5)]),  # varint edges: 127, 128, 2 bytes
    (os.urandom(5000), "ünïcödé 名前.jpg", 2 ** 40, "クラス", "ça, Straße", 2 ** 31, 3, []),
]


@pytest.mark.parametrize("case", CASES, ids=["tiny", "big-with-boxes", "empty-varint-edges", "unicode-large-ints"])
def test_examples_are_tensorflows_byte_for_byte(case):
    assert b"".join(schema.serialize_example(*case)) == tf_example(*case)


def test_feature_encoders_against_tensorflows_messages():
    for values in ([], [0], [-1], [-(2 ** 63), 2 ** 63 - 1, 300, 7]):
        ours = tf.train.Feature.FromString(b"".join(tfrecord.int64_feature(values)))
        assert list(ours.int64_list.value) == values and ours.WhichOneof("kind") == "int64_list"
    for values in ([], [0.5, -2.25, 2.0 ** -100]):  # exact in float32
        ours = tf.train.Feature.FromString(b"".join(tfrecord.float_feature(values)))
        assert list(ours.float_list.value) == values and ours.WhichOneof("kind") == "float_list"
    assert tf.train.Feature.FromString(b"".join(tfrecord.bytes_feature(b"x" * 300))).bytes_list.value == [b"x" * 300]


def test_record_files_are_tensorflows_and_read_back(tmp_path):
    records = [b"".join(schema.serialize_example(*case)) for case in CASES] + [b"", b"\x00" * 70_000]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with open(ours, "wb") as f:
        writer = tfrecord.RecordWriter(f)
        for record in records:
            writer.write(*(record[i:i + 3000] for i in range(0, len(record), 3000)) if record else (b"",))
    with tf.io.TFRecordWriter(str(theirs)) as w:
        for record in records:
            w.write(record)
    data = ours.read_bytes()
    assert data == theirs.read_bytes()
    assert writer.bytes == len(data) and writer.sha256() == hashlib.sha256(data).hexdigest()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == records


def test_a_damaged_record_is_caught_by_tensorflows_checksum(tmp_path):
    path = tmp_path / "records"
    with open(path, "wb") as f:
        tfrecord.RecordWriter(f).write(b"".join(schema.serialize_example(*CASES[1])))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(path)))


def test_the_converters_workers_do_not_import_tensorflow(tmp_path):
    from PIL import Image

    for i in range(4):
        folder = tmp_path / "src" / ("train" if i else "validation") / "cat"
        folder.mkdir(parents=True, exist_ok=True)
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(out, "JPEG")
        (folder / f"{i}.jpg").write_bytes(out.getvalue())
    # workers=1 runs the shard writer in this process: all a spawned worker runs besides
    # importing hrnet.data.convert.
    script = ("import sys\n"
              "from hrnet.data.convert import convert_dataset\n"
              "convert_dataset(sys.argv[1], sys.argv[2], workers=1, progress=False)\n"
              "print('tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
    assert {"labels.txt", "manifest.json", "train-00000-of-00001"} <= set(os.listdir(tmp_path / "out"))

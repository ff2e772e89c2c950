"""hrnet convert: odd images, bad files, layouts, errors before work, and resuming after SIGKILL."""
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
from helpers import kill_when, write_jpeg_tree
from PIL import Image

from hrnet import storage
from hrnet.cli import main as cli_main
from hrnet.data.convert import convert_dataset
from hrnet.data.images import orient_boxes, read_image
from hrnet.errors import HrnetError

RNG = np.random.RandomState(0)


def noise(w, h, seed=0):
    """A noisy RGB array: its JPEG is > 8 KB, so the converter trusts its header and EOI."""
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def save(path, image, fmt="JPEG", **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, fmt, **kw)
    return path


def jpeg_bytes(image, **kw):
    out = io.BytesIO()
    image.save(out, "JPEG", **kw)
    return out.getvalue()


def read_records(path):
    import tensorflow as tf

    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def feature(example, key):
    f = example.features.feature[key]
    kind = f.WhichOneof("kind")
    values = list(getattr(f, kind).value) if kind else []
    return values


def by_name(path):
    return {feature(e, "image/filename")[0].decode(): e for e in read_records(path)}


def shards_of(out, split):
    return sorted(n for n in os.listdir(out) if n.startswith(split + "-"))


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """cat/ and dog/ with every kind of file the converter must handle."""
    root = str(tmp_path_factory.mktemp("odd"))
    t = os.path.join(root, "train")
    expected = {}  # relative name -> (label, (height, width))
    for i, (w, h) in enumerate([(96, 80), (100, 90), (90, 96)]):
        save(os.path.join(t, "cat", f"rgb{i}.jpg"), Image.fromarray(noise(w, h, i)), quality=95)
        expected[f"cat/rgb{i}.jpg"] = (0, (h, w))
    # A PNG named .JPEG (as n02105855_2933.JPEG in ImageNet), CMYK and grayscale JPEGs.
    save(os.path.join(t, "cat", "png_named.JPEG"), Image.fromarray(noise(40, 30, 5)), "PNG")
    expected["cat/png_named.JPEG"] = (0, (30, 40))
    save(os.path.join(t, "dog", "cmyk.jpg"), Image.fromarray(noise(50, 40, 6)).convert("CMYK"), quality=90)
    expected["dog/cmyk.jpg"] = (1, (40, 50))
    save(os.path.join(t, "dog", "gray.jpeg"), Image.fromarray(noise(44, 33, 7)).convert("L"), quality=90)
    expected["dog/gray.jpeg"] = (1, (33, 44))
    # EXIF orientation 6: the camera held sideways; viewers rotate 90 degrees clockwise.
    raw = np.zeros((24, 40, 3), np.uint8)
    raw[:6, :6] = (255, 0, 0)  # red, top-left of the raw pixels -> top-right when upright
    exif = Image.Exif()
    exif[0x0112] = 6
    save(os.path.join(t, "dog", "rotated.jpg"), Image.fromarray(raw), quality=95, exif=exif.tobytes())
    expected["dog/rotated.jpg"] = (1, (40, 24))
    save(os.path.join(t, "dog", "tiny.bmp"), Image.fromarray(noise(20, 16, 8)), "BMP")
    expected["dog/tiny.bmp"] = (1, (16, 20))
    save(os.path.join(t, "dog", "pic.webp"), Image.fromarray(noise(30, 20, 9)), "WEBP")
    expected["dog/pic.webp"] = (1, (20, 30))
    # Bad files: a truncated JPEG, text named .jpg, and a file that is no image at all.
    whole = jpeg_bytes(Image.fromarray(noise(120, 100, 10)), quality=95)
    with open(os.path.join(t, "dog", "truncated.jpg"), "wb") as f:
        f.write(whole[: len(whole) // 2])
    with open(os.path.join(t, "cat", "fake.jpg"), "w") as f:
        f.write("this is not a JPEG")
    with open(os.path.join(t, "cat", "notes.txt"), "w") as f:
        f.write("photographer: someone")
    save(os.path.join(t, "loose.jpg"), Image.fromarray(noise(20, 20, 11)))  # in no class folder
    v = os.path.join(root, "validation")
    for i, c in enumerate(["cat", "dog", "dog"]):
        save(os.path.join(v, c, f"val{i}.jpg"), Image.fromarray(noise(64, 48, 20 + i)), quality=95)
    bad = {"train/dog/truncated.jpg", "train/cat/fake.jpg", "train/cat/notes.txt", "train/loose.jpg"}
    return root, expected, bad


def test_odd_images_become_rgb_records_and_bad_files_are_reported(odd_tree, tmp_path):
    import tensorflow as tf

    root, expected, bad = odd_tree
    out = str(tmp_path / "out")
    manifest = convert_dataset(root, out, train_shards=2, validation_shards=1, workers=1, progress=False)

    seen = {}
    for name in shards_of(out, "train"):
        for ex in read_records(os.path.join(out, name)):
            fname = feature(ex, "image/filename")[0].decode()
            encoded = feature(ex, "image/encoded")[0]
            image = tf.io.decode_jpeg(encoded, channels=3).numpy()  # as the readers decode it
            h, w = feature(ex, "image/height")[0], feature(ex, "image/width")[0]
            assert (h, w) == image.shape[:2]
            assert feature(ex, "image/format") == [b"JPEG"] and feature(ex, "image/colorspace") == [b"RGB"]
            assert "/" not in fname  # the bare file name, as slim stores it
            label = feature(ex, "image/class/label")[0]
            seen[("cat", "dog")[label] + "/" + fname] = (label, (h, w), encoded, image)
    assert {k: v[:2] for k, v in seen.items()} == expected

    # A good RGB or grayscale JPEG is stored byte for byte, as slim stores it; the others
    # were re-encoded.
    with open(os.path.join(root, "train", "cat", "rgb1.jpg"), "rb") as f:
        assert seen["cat/rgb1.jpg"][2] == f.read()
    with open(os.path.join(root, "train", "dog", "gray.jpeg"), "rb") as f:
        assert seen["dog/gray.jpeg"][2] == f.read()
    assert tf.io.decode_jpeg(seen["dog/gray.jpeg"][2]).shape[2] == 1
    with open(os.path.join(root, "train", "dog", "cmyk.jpg"), "rb") as f:
        assert seen["dog/cmyk.jpg"][2] != f.read()
    upright = seen["dog/rotated.jpg"][3]
    assert upright[2, -3, 0] > 200 and upright[2, -3, 1] < 60  # the red corner is now top-right
    assert upright[2, 2, 0] < 60

    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {os.path.join(*p.split("/")) for p in bad}
    assert "truncated" in reasons[os.path.join("train", "dog", "truncated.jpg")]
    assert "not a readable image" in reasons[os.path.join("train", "cat", "fake.jpg")]
    assert "not an image file" in reasons[os.path.join("train", "cat", "notes.txt")]
    assert "not inside a class folder" in reasons[os.path.join("train", "loose.jpg")]
    assert manifest["reencoded"] == {"PNG": 1, "CMYK": 1, "EXIF-rotated": 1, "BMP": 1, "WEBP": 1}

    files = sum(len(fs) for _, _, fs in os.walk(root))
    assert manifest["counts"] == {"train": len(expected), "validation": 3}
    assert manifest["counts"]["train"] + manifest["counts"]["validation"] + manifest["num_skipped"] == files
    assert manifest["counts_per_class"] == {"train": {"cat": 4, "dog": 5}, "validation": {"cat": 1, "dog": 2}}
    assert sum(s["records"] for s in manifest["shards"]["train"]) == len(expected)
    assert [s["path"] for s in manifest["shards"]["train"]] == ["train-00000-of-00002", "train-00001-of-00002"]
    assert manifest["num_classes"] == 2 and manifest["label_offset"] == 0
    with open(os.path.join(out, "labels.txt")) as f:
        assert f.read() == "0\tcat\tcat\n1\tdog\tdog\n"
    # No temp or state files left (the mark that the folder is a tfrecords output stays).
    assert not [n for n in os.listdir(out) if n.startswith(".") and n not in storage.CONTROL_FILES]


def test_strict_mode_stops_at_the_first_bad_file(odd_tree, tmp_path, capsys):
    root, _, _ = odd_tree
    with pytest.raises(HrnetError, match="strict"):
        convert_dataset(root, str(tmp_path / "out"), workers=1, strict=True, progress=False)
    assert cli_main(["convert", "--src", root, "--out", str(tmp_path / "cli"), "--strict", "--no-progress",
                     "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrnet convert: error:") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(str(tmp_path / "cli"), "manifest.json"))


def test_read_image_detects_truncation_of_a_large_jpeg(tmp_path):
    data = jpeg_bytes(Image.fromarray(noise(200, 150, 3)), quality=95)
    assert len(data) > 8192
    good, cut = str(tmp_path / "good.jpg"), str(tmp_path / "cut.jpg")
    with open(good, "wb") as f:
        f.write(data)
    with open(cut, "wb") as f:
        f.write(data[:-2000])
    assert read_image(good) == (data, 150, 200, None)
    with pytest.raises(Exception, match="truncated"):
        read_image(cut)


def test_verify_finds_random_bytes_inside_a_complete_jpeg_that_decoders_pass(tmp_path):
    import random

    from hrnet.data.images import jpeg_structure_error

    data = jpeg_bytes(Image.fromarray(noise(240, 200, 4)), quality=95)
    rng = random.Random(45)
    at = rng.randrange(1000, len(data) - 4000)
    corrupt = data[:at] + bytes(rng.randrange(256) for _ in range(3000)) + data[at:]
    Image.open(io.BytesIO(corrupt)).load()  # PIL (what --verify decoded with) passes this one
    tree = tmp_path / "tree" / "train"
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    (tree / "a" / "corrupt.jpg").write_bytes(corrupt)
    # Valid JPEGs of every structure pass: baseline, progressive, optimized, restart markers.
    for i, kw in enumerate([dict(quality=95), dict(progressive=True), dict(optimize=True),
                            dict(restart_marker_blocks=4), dict(restart_marker_rows=1)]):
        valid = jpeg_bytes(Image.fromarray(noise(64, 48, 10 + i)), **kw)
        assert jpeg_structure_error(valid) is None, kw
        (tree / "b" / f"valid{i}.jpg").write_bytes(valid)
    (tree / "a" / "fine.jpg").write_bytes(data)

    plain = convert_dataset(str(tmp_path / "tree"), str(tmp_path / "plain"), workers=1, progress=False)
    assert plain["counts"]["train"] == 7 and not plain["skipped"]  # without --verify it goes in
    checked = convert_dataset(str(tmp_path / "tree"), str(tmp_path / "checked"), workers=1, progress=False,
                              verify=True)
    assert checked["counts"]["train"] == 6
    (skip,) = checked["skipped"]
    assert skip["path"] == "train/a/corrupt.jpg" and skip["reason"].startswith("corrupt JPEG (")
    # The share of damage the walk finds: 3,000 random bytes at random places in 100 copies.
    found = sum(bool(jpeg_structure_error(data[:p] + bytes(rng.randrange(256) for _ in range(3000)) + data[p:]))
                for p in (rng.randrange(1000, len(data) - 1000) for _ in range(100)))
    assert found >= 97


def test_orient_boxes_follow_exif_transpose():
    from PIL import ImageOps

    raw = np.zeros((30, 50), np.uint8)
    raw[3:9, 10:20] = 255  # box x 10..20, y 3..9 of a 50x30 image
    box = [(10 / 50, 3 / 30, 20 / 50, 9 / 30)]
    for orientation in range(1, 9):
        image = Image.fromarray(raw)
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.info["exif"] = exif.tobytes()
        upright = np.asarray(ImageOps.exif_transpose(image))
        ys, xs = np.nonzero(upright)
        h, w = upright.shape
        got = orient_boxes(box, orientation)[0]
        want = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"orientation {orientation}")


def _imagenet_tree(root, val_labels="csv"):
    """A 3-synset ImageNet-like tree: train synset folders, flat val, XML boxes."""
    synsets = ["n01440764", "n01443537", "n01484850"]
    texts = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    for s in synsets:
        for i in range(2):
            save(os.path.join(root, "train", s, f"{s}_{i}.JPEG"), Image.fromarray(noise(60, 40, i)), quality=95)
    os.makedirs(os.path.join(root, "bbox"))
    with open(os.path.join(root, "bbox", f"{synsets[1]}_0.xml"), "w") as f:
        f.write("<annotation><size><width>60</width><height>40</height></size>"
                "<object><name>n01443537</name><bndbox><xmin>6</xmin><ymin>4</ymin><xmax>30</xmax>"
                "<ymax>40</ymax></bndbox></object></annotation>")
    val_truth = [synsets[2], synsets[0], synsets[1], synsets[2]]
    for i in range(len(val_truth)):
        save(os.path.join(root, "val", f"ILSVRC2012_val_{i + 1:08d}.JPEG"), Image.fromarray(noise(50, 50, 9 + i)),
             quality=95)
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{s} {t}\n" for s, t in zip(synsets, texts))
    if val_labels == "csv":
        with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
            f.write("ImageId,PredictionString\n")
            for i, s in enumerate(val_truth):
                f.write(f"ILSVRC2012_val_{i + 1:08d},{s} 5 10 25 50 {s} 0 0 50 50 \n")
    return synsets, texts, val_truth


def test_imagenet_layout_with_loc_csv_boxes_and_slim_labels(tmp_path):
    root = str(tmp_path / "imagenet")
    synsets, texts, val_truth = _imagenet_tree(root)
    out = str(tmp_path / "out")
    manifest = convert_dataset(root, out, bbox_dir=os.path.join(root, "bbox"), label_offset=1, workers=1,
                               progress=False)
    assert manifest["counts"] == {"train": 6, "validation": 4} and manifest["label_offset"] == 1
    with open(os.path.join(out, "labels.txt")) as f:
        assert f.read().splitlines() == [f"{i + 1}\t{s}\t{t}" for i, (s, t) in enumerate(zip(synsets, texts))]
    train = by_name(os.path.join(out, shards_of(out, "train")[0]))
    boxed = train[f"{synsets[1]}_0.JPEG"]  # the bare name, as slim stores it
    assert feature(boxed, "image/class/label") == [2]
    assert feature(boxed, "image/class/text") == [texts[1].encode()]
    box = [feature(boxed, "image/object/bbox/" + k)[0] for k in ("xmin", "ymin", "xmax", "ymax")]
    np.testing.assert_allclose(box, [0.1, 0.1, 0.5, 1.0], atol=1e-6)
    assert feature(boxed, "image/object/bbox/label") == [2]
    assert feature(train[f"{synsets[0]}_1.JPEG"], "image/object/bbox/xmin") == []
    val = by_name(os.path.join(out, shards_of(out, "validation")[0]))
    for i, s in enumerate(val_truth):
        e = val[f"ILSVRC2012_val_{i + 1:08d}.JPEG"]
        assert feature(e, "image/class/synset") == [s.encode()]
        assert feature(e, "image/class/label") == [synsets.index(s) + 1]
        np.testing.assert_allclose(feature(e, "image/object/bbox/xmax"), [0.5, 1.0], atol=1e-6)


def test_devkit_ground_truth_and_missing_labels(tmp_path):
    root = str(tmp_path / "imagenet")
    synsets, _, val_truth = _imagenet_tree(root, val_labels=None)
    devkit_order = [synsets[2], synsets[0], synsets[1]]  # the devkit's ID order is not sorted
    with open(os.path.join(root, "devkit_synsets.txt"), "w") as f:
        f.writelines(s + "\n" for s in devkit_order)
    truth = os.path.join(root, "ILSVRC2012_validation_ground_truth.txt")
    with open(truth, "w") as f:
        f.writelines(f"{devkit_order.index(s) + 1}\n" for s in val_truth)
    out = str(tmp_path / "out")
    with pytest.raises(HrnetError, match="devkit"):
        convert_dataset(root, out, progress=False)
    assert not os.path.exists(out)  # the error came before any work
    convert_dataset(root, out, devkit=os.path.join(root, "devkit_synsets.txt"), workers=1, progress=False)
    val = read_records(os.path.join(out, shards_of(out, "validation")[0]))
    got = {feature(e, "image/filename")[0].decode(): feature(e, "image/class/label")[0] for e in val}
    assert got == {f"ILSVRC2012_val_{i + 1:08d}.JPEG": synsets.index(s) for i, s in enumerate(val_truth)}

    # The devkit's own meta.mat, found in SRC/ILSVRC2012_devkit_t12/data/ (non-leaf synsets have IDs > 1000).
    from scipy.io import savemat

    rows = [(i + 1, s, 0) for i, s in enumerate(devkit_order)] + [(1001, "n00001740", 3)]
    meta = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    os.makedirs(os.path.join(root, "ILSVRC2012_devkit_t12", "data"))
    savemat(os.path.join(root, "ILSVRC2012_devkit_t12", "data", "meta.mat"), {"synsets": meta.reshape(-1, 1)})
    out_mat = str(tmp_path / "out_mat")
    convert_dataset(root, out_mat, workers=1, progress=False)
    val = read_records(os.path.join(out_mat, shards_of(out_mat, "validation")[0]))
    assert {feature(e, "image/filename")[0].decode(): feature(e, "image/class/label")[0] for e in val} == got

    # A labels file naming an image that is not there, or one image short of labels.
    with open(truth, "a") as f:
        f.write("1\n")
    with pytest.raises(HrnetError, match="5 labels but the validation folder holds 4"):
        convert_dataset(root, str(tmp_path / "o2"), devkit=os.path.join(root, "devkit_synsets.txt"), progress=False)
    csv_path = os.path.join(root, "LOC_val_solution.csv")
    with open(csv_path, "w") as f:
        f.write("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 1 2 2\n"
                "ILSVRC2012_val_00000099,n01440764 1 1 2 2\n")
    with pytest.raises(HrnetError, match="not in the validation folder .*ILSVRC2012_val_00000099"):
        convert_dataset(root, str(tmp_path / "o3"), val_labels=csv_path, progress=False)
    assert not os.path.exists(str(tmp_path / "o3"))


def test_errors_before_any_work(tmp_path, odd_tree):
    root = str(tmp_path / "src")
    save(os.path.join(root, "train", "a", "x.jpg"), Image.fromarray(noise(32, 32)))
    os.makedirs(os.path.join(root, "train", "empty"))
    with pytest.raises(HrnetError, match="class folder without images: empty"):
        convert_dataset(root, str(tmp_path / "o1"), progress=False)
    with pytest.raises(HrnetError, match="no train/ or validation/"):
        convert_dataset(os.path.join(root, "train"), str(tmp_path / "o1"), progress=False)
    with pytest.raises(FileNotFoundError):
        convert_dataset(str(tmp_path / "nowhere"), str(tmp_path / "o1"), progress=False)
    assert not os.path.exists(str(tmp_path / "o1"))

    os.rmdir(os.path.join(root, "train", "empty"))
    out = str(tmp_path / "out")
    first = convert_dataset(root, out, workers=1, progress=False)
    assert convert_dataset(root, out, workers=1, progress=False) == first  # done already: nothing to do
    with pytest.raises(HrnetError, match="different data set"):
        convert_dataset(odd_tree[0], out, workers=1, progress=False)
    foreign = str(tmp_path / "foreign")
    os.makedirs(foreign)
    open(os.path.join(foreign, "thesis.pdf"), "w").close()
    with pytest.raises(HrnetError, match="not empty"):
        convert_dataset(root, foreign, progress=False)


def test_sigkill_then_rerun_equals_a_clean_run(tmp_path):
    root = str(tmp_path / "src")
    for c in range(3):
        for i in range(40):
            # PNGs: every one is decoded and re-encoded, so the conversion takes a while.
            save(os.path.join(root, "train", f"class{c}", f"{i}.png"), Image.fromarray(noise(64, 48, c * 100 + i)),
                 "PNG")
        save(os.path.join(root, "validation", f"class{c}", "v.jpg"), Image.fromarray(noise(64, 48, c)))
    options = dict(train_shards=24, validation_shards=2)
    killed = str(tmp_path / "killed")
    code = ("import sys; from hrnet.data.convert import convert_dataset; "
            f"convert_dataset(sys.argv[1], sys.argv[2], workers=2, progress=False, **{options!r})")
    # The pod is gone: the worker processes with it.
    kill_when([sys.executable, "-c", code, root, killed],
              lambda: os.path.isdir(killed) and len(shards_of(killed, "train")) >= 2, tmp_path / "killed.log",
              timeout=120, group=True)
    kept = {n: os.stat(os.path.join(killed, n)).st_ino for n in shards_of(killed, "train")}
    assert 2 <= len(kept) < 24, "the kill did not land part-way (%d shards)" % len(kept)
    assert not os.path.exists(os.path.join(killed, "manifest.json"))

    resumed = convert_dataset(root, killed, workers=1, progress=False, **options)
    clean_dir = str(tmp_path / "clean")
    clean = convert_dataset(root, clean_dir, workers=1, progress=False, **options)
    for n, inode in kept.items():
        assert os.stat(os.path.join(killed, n)).st_ino == inode  # finished shards were kept, not rewritten
    assert sorted(os.listdir(killed)) == sorted(os.listdir(clean_dir))
    for split in ("train", "validation"):
        for n in shards_of(clean_dir, split):
            a, b = read_records(os.path.join(killed, n)), read_records(os.path.join(clean_dir, n))
            assert a == b, n
    for key in ("counts", "counts_per_class", "shards", "skipped", "fingerprint"):
        assert resumed[key] == clean[key]
    assert json.load(open(os.path.join(killed, "manifest.json")))["shards"] == clean["shards"]


def test_convert_from_a_bucket_of_images_to_a_bucket(s3_env, tmp_path):
    from hrnet import data, storage
    from hrnet.data.reference import stage

    local = str(tmp_path / "src")
    for c in ("a", "b"):
        for i in range(3):
            save(os.path.join(local, "train", c, f"{i}.jpg"), Image.fromarray(noise(40, 32, i)))
        save(os.path.join(local, "validation", c, "v.jpg"), Image.fromarray(noise(40, 32, 9)))
    storage.mirror(local, s3_env.uri("raw"))  # a plain bucket of images: no manifest.json
    out = s3_env.uri("records")
    manifest = convert_dataset(s3_env.uri("raw"), out, workers=1, progress=False)
    assert manifest["counts"] == {"train": 6, "validation": 2}
    assert storage.exists(out + "/manifest.json")
    info = data.dataset_info(stage(out))  # read back through the verified local cache
    assert info.counts == manifest["counts"] and info.class_names == ["a", "b"]
    x, y = next(iter(data.eval_dataset(info, 8, 32)))
    assert x.shape == (2, 32, 32, 3) and sorted(y.numpy().tolist()) == [0, 1]


def test_real_world_files_16_bit_png_gif_tiff_hidden_files_and_unreadable_classes(tmp_path):
    """What real photo folders hold: a 16-bit grayscale PNG (valid: converted), GIF and TIFF
    (images of a type we do not take: said so), macOS metadata (ignored, even with --strict),
    an unreadable file whose reason must read the same in every run, and a class folder whose
    every file is unreadable (as fatal as an empty one)."""
    root = tmp_path / "src"
    for c in ("a", "b"):
        save(str(root / "train" / c / "ok.jpg"), Image.fromarray(noise(40, 30, ord(c))), quality=95)
    deep = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    save(str(root / "train" / "a" / "deep.png"), Image.fromarray(deep), "PNG")
    save(str(root / "train" / "a" / "anim.gif"), Image.fromarray(noise(20, 20, 3)), "GIF")
    save(str(root / "train" / "b" / "scan.tiff"), Image.fromarray(noise(20, 20, 4)), "TIFF")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "b" / "._ok.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\x89PNG not really")

    manifests = [convert_dataset(str(root), str(tmp_path / f"out{i}"), workers=1, progress=False) for i in (0, 1)]
    reasons = {s["path"]: s["reason"] for s in manifests[0]["skipped"]}
    assert manifests[0]["counts_per_class"]["train"] == {"a": 2, "b": 1}  # the 16-bit PNG is a record
    gif, tiff = os.path.join("train", "a", "anim.gif"), os.path.join("train", "b", "scan.tiff")
    assert "a type the converter does not take (.gif)" in reasons[gif]
    assert "a type the converter does not take (.tiff)" in reasons[tiff]
    assert reasons[os.path.join("train", "b", ".DS_Store")].startswith("hidden file")
    assert reasons[os.path.join("train", "b", "._ok.jpg")].startswith("hidden file")
    broken = reasons[os.path.join("train", "b", "broken.jpg")]
    assert "0x" not in broken and "object at" not in broken, broken
    assert manifests[0]["skipped"] == manifests[1]["skipped"]  # the same run twice, the same manifest

    # --strict stops at the GIF, not at .DS_Store.
    with pytest.raises(HrnetError, match="anim.gif"):
        convert_dataset(str(root), str(tmp_path / "strict"), workers=1, progress=False, strict=True)
    os.remove(root / "train" / "a" / "anim.gif")
    os.remove(root / "train" / "b" / "scan.tiff")
    os.remove(root / "train" / "b" / "broken.jpg")
    convert_dataset(str(root), str(tmp_path / "strict2"), workers=1, progress=False, strict=True)

    # A class whose every file is unreadable is refused, naming it and why.
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "x.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(HrnetError, match=r"no readable image: c \(every file was skipped, e\.g\. .*x\.jpg"):
        convert_dataset(str(root), str(tmp_path / "lost"), workers=1, progress=False)
    # The refused output is left as it was found (here: not there), so the fixed tree converts
    # there (it was refused as "an unfinished conversion of a different input").
    assert not (tmp_path / "lost").exists()
    shutil.copy(root / "train" / "a" / "ok.jpg", root / "train" / "c" / "ok.jpg")
    fixed = convert_dataset(str(root), str(tmp_path / "lost"), workers=1, progress=False)
    assert fixed["counts_per_class"]["train"]["c"] == 1


def test_a_decompression_bomb_is_a_counted_skip(tmp_path):
    """A JPEG whose header claims 65500x65500 pixels (4.3 gigapixels) is skipped with its
    reason, like any unreadable file, instead of ending the conversion."""
    root = tmp_path / "src"
    write_jpeg_tree(root, {"train": [2, 2], "validation": [1, 1]})
    bomb = root / "train" / "class0" / "0.jpg"
    data = bytearray(bomb.read_bytes())
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = (65500).to_bytes(2, "big") * 2  # height, width
    bomb.write_bytes(bytes(data))
    manifest = convert_dataset(str(root), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["counts"] == {"train": 3, "validation": 2}
    (skip,) = manifest["skipped"]
    assert skip["path"] == os.path.join("train", "class0", "0.jpg") and "decompression bomb" in skip["reason"], skip


def test_a_symlink_loop_in_a_class_folder_is_read_once_and_reported(tmp_path):
    """A link inside a class folder back to the folder (train/class1/loop -> .) would list
    its images once per turn of the loop; it is not followed, and the skip says why."""
    root = tmp_path / "src"
    write_jpeg_tree(root, {"train": [2, 3], "validation": [1, 1]})
    os.symlink(".", root / "train" / "class1" / "loop")
    manifest = convert_dataset(str(root), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["counts_per_class"]["train"] == {"class0": 2, "class1": 3}
    (skip,) = manifest["skipped"]
    assert skip["path"] == os.path.join("train", "class1", "loop") and "loop" in skip["reason"], skip


def test_a_file_name_that_is_not_utf8_is_a_named_skip(tmp_path):
    """Such a name ended the conversion with a bare codec error that named no file."""
    root = tmp_path / "src"
    write_jpeg_tree(root, {"train": [2, 2], "validation": [1, 1]})
    shutil.copy(root / "train" / "class0" / "0.jpg", os.fsdecode(bytes(root / "train" / "class0") + b"/caf\xe9.jpg"))
    manifest = convert_dataset(str(root), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["counts"] == {"train": 4, "validation": 2}
    (skip,) = manifest["skipped"]
    assert skip["path"] == os.path.join("train", "class0", "caf\\xe9.jpg") and "not valid UTF-8" in skip["reason"]
    os.rename(root / "train" / "class1", os.fsdecode(bytes(root / "train") + b"/cl\xe4ss1"))
    with pytest.raises(HrnetError, match=r"class folder .*cl\\xe4ss1: its name is not valid UTF-8"):
        convert_dataset(str(root), str(tmp_path / "out2"), workers=1, progress=False)

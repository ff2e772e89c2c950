"""Image trees (ImageNet layouts or folder-per-class) -> sharded TFRecords with slim's keys.

What is faster than slim's build_imagenet_data.py, and why:
- an RGB JPEG is stored byte for byte and its size read from the header (PIL reads only
  the markers on open); only PNGs, CMYK, grayscale and EXIF-rotated images are decoded
  and re-encoded as RGB JPEG;
- worker processes each write whole shards, without importing TensorFlow (hrnet.data.tfrecord
  writes the records and hashes them as they are written).

A script that calls ``convert_dataset`` with more than one worker needs the ``if __name__ ==
"__main__":`` guard: the workers are spawned, and each imports the script's main module.

What makes it safe to run on a cluster:
- the whole input is listed and checked before any work (empty class folders, labels that
  name missing files, an output folder holding another data set);
- each shard is written under a temporary name and renamed when complete, with a small
  state file beside it, so a re-run after a kill keeps the finished shards and produces
  the same records as an uninterrupted run;
- unreadable files are skipped, counted and listed in manifest.json (``strict`` makes
  them fatal); manifest.json is written last.
"""
import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hrnet import storage
from hrnet.data import schema, tfrecord
from hrnet.errors import HrnetError, IncompleteError
from hrnet.fileio import atomic_write
from hrnet.manifest import MANIFEST, file_entry, read_manifest, write_manifest
from hrnet.runtime import usable_cpus

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Images, but of a type the converter does not take (animated, multi-page, vector, HDR...).
OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".svg", ".ico", ".jp2", ".exr")
STATE_DIR = ".convert"
HIDDEN = "hidden file (system metadata), ignored"
TEMP_PREFIX = ".tmp-"
# slim's ImageNet shards hold about this many records: 1024 train and 128 validation shards.
RECORDS_PER_SHARD = {"train": 1250, "validation": 390}
MAX_AUTO_SHARDS = 1024
SHUFFLE_SEED = 12345  # slim's, so that shard contents mix classes the same way
VALIDATION_DIRS = ("validation", "val")
# Where Kaggle's ImageNet download and the plain ImageNet tarballs keep the split folders.
LAYOUT_ROOTS = ("", os.path.join("ILSVRC", "Data", "CLS-LOC"), os.path.join("Data", "CLS-LOC"))
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt",
                   os.path.join("ILSVRC2012_devkit_t12", "data", "ILSVRC2012_validation_ground_truth.txt"),
                   "imagenet_2012_validation_synset_labels.txt")
SYNSET_NAME_FILES = ("LOC_synset_mapping.txt", "imagenet_metadata.txt", "synset_words.txt")
DEVKIT_META = os.path.join("ILSVRC2012_devkit_t12", "data", "meta.mat")


class BadImage(Exception):
    """A source file that cannot become a record; the message is the reason."""


def _why(e: Exception) -> str:
    """An exception's message without object reprs (``<_io.BytesIO object at 0x7f...>``): a
    skip reason must read the same in every run, or two identical runs differ."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


# --------------------------------------------------------------------------------------
# One image -> RGB JPEG bytes
# --------------------------------------------------------------------------------------

def _has_end_marker(data: bytes) -> bool:
    # Entropy-coded JPEG data never holds FF D9 (0xFF is stuffed), so an EOI near the end
    # means the file is complete; tiny files are simply decoded.
    return len(data) > 8192 and b"\xff\xd9" in data[-1024:]


# Markers that stand alone (no length field): TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8, 0xD9}
# What may follow a scan: another scan's tables and header (progressive JPEGs), or the end.
_AFTER_SCAN = {0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xD9, 0xFE, *range(0xE0, 0xF0)}


def jpeg_structure_error(data: bytes) -> Optional[str]:
    """What is wrong with a JPEG's marker structure, or None. libjpeg (under PIL and TF)
    decodes through most damage inside the entropy-coded data, with a warning at most; this
    walk finds what such damage leaves behind: a marker where none may be (0xFF followed by
    anything but a stuffed 0x00 or the next restart marker), a segment that runs past the
    file or is not followed by a marker. Damage that happens to hold no 0xFF byte passes."""
    if data[:2] != b"\xff\xd8":
        return "no JPEG start marker"
    i, n, in_scan, restart_interval, next_rst = 2, len(data), False, 0, 0
    while i < n:
        if in_scan:
            j = data.find(b"\xff", i)
            if j < 0 or j + 1 >= n:
                return "the data ends inside a scan"
            code = data[j + 1]
            if code == 0x00:
                i = j + 2
                continue
            if code == 0xFF:  # fill bytes before a marker
                i = j + 1
                continue
            if 0xD0 <= code <= 0xD7:
                if not restart_interval or code - 0xD0 != next_rst:
                    return f"an unexpected restart marker FF{code:02X} at byte {j}"
                next_rst = (next_rst + 1) % 8
                i = j + 2
                continue
            if code not in _AFTER_SCAN:
                return f"marker FF{code:02X} inside the image data at byte {j}"
            in_scan, i = False, j
        if data[i] != 0xFF:
            return f"byte {i} should start a marker"
        code = data[i + 1] if i + 1 < n else -1
        if code == 0xFF:
            i += 1
            continue
        if code == 0xD9:
            # What follows an end marker is a camera's trailer, an appended image or a motion
            # photo's video, none of it ours; but image data ending in the file's real end
            # marker, after this one, means damage made an end marker of its own.
            rest = data[i + 2:]
            if len(rest) > 2 and rest.endswith(b"\xff\xd9") and not rest.startswith(b"\xff\xd8") \
                    and b"ftyp" not in rest[:16]:
                return f"an end marker at byte {i}, {len(rest)} bytes before the file's own end marker"
            return None
        if code in _STANDALONE or code < 0:
            return f"an unexpected marker FF{code:02X} at byte {i}" if code >= 0 else "the data ends at a marker"
        if i + 4 > n:
            return "the data ends in a segment header"
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return f"segment FF{code:02X} at byte {i} runs past the end of the file"
        if code == 0xDD and length >= 4:
            restart_interval = int.from_bytes(data[i + 4:i + 6], "big")
        if code == 0xDA:
            in_scan, next_rst = True, 0
        i += 2 + length
    return "no JPEG end marker"


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not a broken image
        return 1


def read_image(path: str, quality: int = 95, verify: bool = False) -> Tuple[bytes, int, int, Optional[str]]:
    """(RGB JPEG bytes, height, width, why it was re-encoded or None) of one file.

    An RGB JPEG without EXIF rotation comes back byte for byte; its size is read from the
    header, and it is decoded only to check a file that does not end in an EOI marker
    (truncated) or when ``verify``. Everything else is decoded, turned upright and RGB,
    and encoded as JPEG. Raises BadImage with the reason for files that cannot be read.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        fmt, mode, (width, height) = image.format, image.mode, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not a readable image ({_why(e)})") from None
    orientation = _orientation(image)
    if fmt in ("JPEG", "MPO") and mode == "RGB" and orientation == 1:
        if verify or not _has_end_marker(data):
            try:
                image.load()
            except Exception as e:
                raise BadImage(f"truncated or corrupt JPEG ({_why(e)})") from None
        problem = jpeg_structure_error(data) if verify else None
        if problem:
            raise BadImage(f"corrupt JPEG ({problem})")
        return data, height, width, None
    try:
        image.load()
        reasons = []
        if fmt not in ("JPEG", "MPO"):
            reasons.append(fmt or "unknown format")
        elif mode != "RGB":
            reasons.append(mode)
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
            reasons.append("EXIF-rotated")
        image = _to_rgb(image)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage("truncated or corrupt {} ({})".format(fmt or "image", _why(e))) from None
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), image.height, image.width, "+".join(reasons)


def _to_rgb(image):
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours; show them on white, as a viewer does.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale (PNG): scaled to 8 bits, as a viewer shows it.
        import numpy as np

        pixels = np.asarray(image, dtype=np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise BadImage(f"unsupported {image.mode} pixel values outside 0..65535")
        scale = 257.0 if image.mode != "I" or pixels.max() > 255 else 1.0
        return Image.fromarray(np.round(pixels / scale).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise BadImage("unsupported floating-point pixels (mode F)")
    return image.convert("RGB")


def orient_boxes(boxes: Sequence[Sequence[float]], orientation: int) -> List[Tuple[float, float, float, float]]:
    """Normalized (xmin, ymin, xmax, ymax) boxes of the raw image, in the upright image
    ``ImageOps.exif_transpose`` makes for EXIF ``orientation`` (1-8)."""

    def point(x, y):
        return {1: (x, y), 2: (1 - x, y), 3: (1 - x, 1 - y), 4: (x, 1 - y),
                5: (y, x), 6: (1 - y, x), 7: (1 - y, 1 - x), 8: (y, 1 - x)}.get(orientation, (x, y))

    out = []
    for xmin, ymin, xmax, ymax in boxes:
        (x0, y0), (x1, y1) = point(xmin, ymin), point(xmax, ymax)
        out.append((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return out


def read_xml_boxes(path: str) -> Tuple[Optional[Tuple[int, int]], List[Tuple[float, float, float, float]]]:
    """((width, height) the boxes refer to, pixel boxes) of an ImageNet/PASCAL XML annotation."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    ref = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        ref = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    boxes = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        if b is not None:
            boxes.append(tuple(float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return ref, boxes


def normalize_boxes(boxes, ref_size: Tuple[int, int]) -> List[Tuple[float, float, float, float]]:
    """Pixel boxes -> [0, 1] boxes, clipped; empty ones dropped."""
    w, h = float(ref_size[0]), float(ref_size[1])
    out = []
    for xmin, ymin, xmax, ymax in boxes:
        xmin, xmax = sorted((min(max(xmin / w, 0.0), 1.0), min(max(xmax / w, 0.0), 1.0)))
        ymin, ymax = sorted((min(max(ymin / h, 0.0), 1.0), min(max(ymax / h, 0.0), 1.0)))
        if xmax > xmin and ymax > ymin:
            out.append((xmin, ymin, xmax, ymax))
    return out


# --------------------------------------------------------------------------------------
# The plan: every input file, its label and its shard, checked before any work
# --------------------------------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def _raise(error: OSError) -> None:
    raise error  # os.walk would skip an unreadable folder without a word


def _walk_files(folder: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_raise):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return found


def _scan_class_folders(split_dir: str) -> Tuple[Dict[str, List[str]], List[str]]:
    """({class folder: [image paths]}, [other files]) of a folder-per-class split."""
    classes, others = {}, []
    for entry in sorted(os.listdir(split_dir)):
        full = os.path.join(split_dir, entry)
        if os.path.isdir(full):
            if not os.access(full, os.R_OK | os.X_OK):
                raise HrnetError(f"cannot read the class folder {full}: permission denied (check its owner and mode, "
                                 "and the user this runs as)")
            files = _walk_files(full)
            classes[entry] = [f for f in files if _is_image_name(f)]
            others.extend(f for f in files if not _is_image_name(f))
        else:
            others.append(full)
    return classes, others


def _read_synset_names(path: str) -> Dict[str, str]:
    """wnid -> readable name from LOC_synset_mapping.txt / imagenet_metadata.txt / synset_words.txt."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                parts = line.split("\t", 1) if "\t" in line else line.split(" ", 1)
                names[parts[0].strip()] = parts[1].strip() if len(parts) > 1 else ""
    return names


def _devkit_synsets(devkit: str) -> List[str]:
    """WNIDs in the devkit's ILSVRC2012_ID order (ID 1 first): from meta.mat, a devkit
    folder, or a text file with one WNID per line."""
    path = devkit
    if os.path.isdir(path):
        for candidate in ("meta.mat", os.path.join("data", "meta.mat"), DEVKIT_META):
            if os.path.exists(os.path.join(path, candidate)):
                path = os.path.join(path, candidate)
                break
        else:
            raise HrnetError(f"no meta.mat in the devkit folder {devkit}")
    if path.endswith(".mat"):
        try:
            from scipy.io import loadmat
        except ImportError as e:
            raise HrnetError("reading the devkit's meta.mat needs scipy; or pass a text file of the "
                             "1000 WNIDs in ILSVRC2012_ID order") from e
        synsets = loadmat(path, squeeze_me=True)["synsets"]
        by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        return [by_id[i] for i in sorted(by_id)]
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _read_val_labels(path: str, images: List[str], devkit: Optional[str]):
    """{image path: (wnid, pixel boxes)} for a flat validation folder; errors for labels
    that name missing images and images without a label."""
    stems = {os.path.splitext(os.path.basename(p))[0]: p for p in images}
    labels: Dict[str, Tuple[str, List[Tuple[float, ...]]]] = {}
    if path.lower().endswith(".csv"):  # Kaggle: ImageId,PredictionString "wnid x0 y0 x1 y1 wnid ..."
        missing = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                image_id = row.get("ImageId")
                tokens = (row.get("PredictionString") or "").split()
                if image_id is None or not tokens:
                    raise HrnetError(f"{path}: expected columns ImageId,PredictionString")
                if image_id not in stems:
                    missing.append(image_id)
                    continue
                boxes = [tuple(float(t) for t in tokens[i + 1:i + 5]) for i in range(0, len(tokens) - 4, 5)]
                labels[stems[image_id]] = (tokens[0], boxes)
        if missing:
            more = ", ..." if len(missing) > 3 else ""
            raise HrnetError(f"{path} names {len(missing)} images that are not in the validation folder "
                             f"({', '.join(missing[:3])}{more})")
    else:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        if len(lines) != len(images):
            raise HrnetError(f"{path} has {len(lines)} labels but the validation folder holds {len(images)} images")
        ordered = sorted(images, key=os.path.basename)
        if all(line.isdigit() for line in lines):  # the devkit's ground truth: ILSVRC2012_IDs
            if devkit is None:
                raise HrnetError(f"{path} holds ILSVRC2012_IDs; pass the devkit (meta.mat) to map them to synsets")
            order = _devkit_synsets(devkit)
            for image, line in zip(ordered, lines):
                if not 1 <= int(line) <= len(order):
                    raise HrnetError(f"{path}: label {line} outside 1..{len(order)}")
                labels[image] = (order[int(line) - 1], [])
        else:  # slim's imagenet_2012_validation_synset_labels.txt: one WNID per image
            labels = {image: (line.split()[0], []) for image, line in zip(ordered, lines)}
    unlabeled = [p for p in images if p not in labels]
    if unlabeled:
        raise HrnetError(f"{len(unlabeled)} validation images have no label in {path} "
                         f"(e.g. {os.path.basename(unlabeled[0])})")
    return labels


def _find_first(roots: Sequence[str], names: Sequence[str]) -> Optional[str]:
    for root in roots:
        for name in names:
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
    return None


def _auto_shards(n: int, split: str) -> int:
    return max(1, min(MAX_AUTO_SHARDS, int(round(n / float(RECORDS_PER_SHARD[split])))))


def make_plan(src: str, *, train_dir: Optional[str] = None, validation_dir: Optional[str] = None,
              val_labels: Optional[str] = None, devkit: Optional[str] = None,
              synset_names: Optional[str] = None, bbox_dir: Optional[str] = None,
              train_shards: Optional[int] = None, validation_shards: Optional[int] = None,
              label_offset: int = 0, seed: int = SHUFFLE_SEED) -> Dict[str, Any]:
    """List and check the whole input; raise HrnetError for anything wrong before work starts."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no such input folder: {src}")
    if label_offset not in (0, 1):
        raise ValueError("label_offset must be 0 (labels 0..N-1) or 1 (slim's 1..N, 0 = background)")
    roots = [os.path.join(src, r) if r else src for r in LAYOUT_ROOTS]
    if train_dir is None and validation_dir is None:
        root = next((r for r in roots if os.path.isdir(os.path.join(r, "train"))
                     or any(os.path.isdir(os.path.join(r, v)) for v in VALIDATION_DIRS)), None)
        if root is None:
            raise HrnetError(f"{src} holds no train/ or validation/ (or val/) folder: expected train/<class>/*.jpg "
                             "and validation/<class>/*.jpg (or a flat val/ with a labels file)")
        train_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else None
        validation_dir = next((os.path.join(root, v) for v in VALIDATION_DIRS
                               if os.path.isdir(os.path.join(root, v))), None)
    for d in (train_dir, validation_dir):
        if d is not None and not os.path.isdir(d):
            raise FileNotFoundError(f"no such folder: {d}")

    skipped: List[Dict[str, str]] = []
    per_split: Dict[str, List[Tuple[str, str, Any]]] = {}  # split -> [(path, class, boxes)]
    class_sets = {}
    for split, split_dir in (("train", train_dir), ("validation", validation_dir)):
        if split_dir is None:
            continue
        folders, others = _scan_class_folders(split_dir)
        loose_images = [p for p in others if os.path.dirname(p) == split_dir and _is_image_name(p)]
        if split == "validation" and not folders and loose_images:  # flat: labels come from a file
            labels_path = val_labels or _find_first([src, os.path.dirname(split_dir)] + roots, VAL_LABEL_FILES)
            if labels_path is None:
                raise HrnetError(f"{split_dir} holds images but no class folders; give the labels file "
                                 "(LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt)")
            if devkit is None:
                devkit = _find_first([src] + roots, (DEVKIT_META,))
            labels = _read_val_labels(labels_path, loose_images, devkit)
            items = [(p, labels[p][0], labels[p][1]) for p in loose_images]
            others = [p for p in others if p not in labels]
            class_sets[split] = sorted({c for _, c, _ in items})
        else:
            empty = [c for c, files in folders.items() if not files]
            if empty:
                raise HrnetError("{}: class folder{} without images: {}".format(
                    split_dir, "s" if len(empty) > 1 else "", ", ".join(empty[:5])))
            if not folders:
                raise HrnetError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/<images>)")
            items = [(p, c, None) for c, files in folders.items() for p in files]
            class_sets[split] = sorted(folders)
        for p in others:
            ext = os.path.splitext(p)[1].lower()
            if os.path.dirname(p) == split_dir and _is_image_name(p):
                reason = "not inside a class folder"
            elif os.path.basename(p).startswith("."):
                reason = HIDDEN  # .DS_Store, ._foo.jpg (macOS), .directory: no one's data
            elif ext in OTHER_IMAGE_EXTENSIONS:
                reason = f"an image of a type the converter does not take ({ext}): convert it to JPEG or PNG"
            else:
                reason = "not an image file ({})".format(ext or "no extension")
            skipped.append({"split": split, "path": os.path.relpath(p, src), "reason": reason})
        per_split[split] = items

    classes = class_sets.get("train") or class_sets["validation"]
    unknown = sorted(set(class_sets.get("validation", [])) - set(classes))
    if unknown:
        raise HrnetError("validation classes missing from train/: {}".format(", ".join(unknown[:5])))
    class_index = {c: i for i, c in enumerate(classes)}

    names_path = synset_names or _find_first([src] + roots, SYNSET_NAME_FILES)
    names = _read_synset_names(names_path) if names_path else {}
    texts = [names.get(c, c) for c in classes]

    xml_by_stem = {}
    if bbox_dir is not None:
        if not os.path.isdir(bbox_dir):
            raise FileNotFoundError(f"no such bounding box folder: {bbox_dir}")
        for path in _walk_files(bbox_dir):
            if path.lower().endswith(".xml"):
                xml_by_stem[os.path.splitext(os.path.basename(path))[0]] = path

    # Items are small tuples (ImageNet has 1.3 million): (path, class index, pixel boxes, xml path).
    shards, plan_items = {}, {}
    for split, items in per_split.items():
        records = [(path, class_index[c], boxes or [],
                    xml_by_stem.get(os.path.splitext(os.path.basename(path))[0])) for path, c, boxes in items]
        # Fixed shuffle (as slim): each shard mixes classes, the same on every run.
        records.sort()
        random.Random(seed).shuffle(records)
        requested = train_shards if split == "train" else validation_shards
        n = requested or _auto_shards(len(records), split)
        if n < 1:
            raise ValueError(f"{split}_shards must be at least 1")
        shards[split] = n
        plan_items[split] = records
    fingerprint = hashlib.sha256(json.dumps({
        "items": {s: [(os.path.relpath(path, src), c, xml and os.path.basename(xml)) for path, c, _, xml in recs]
                  for s, recs in plan_items.items()},
        "shards": shards, "label_offset": label_offset, "seed": seed,
    }, sort_keys=True).encode()).hexdigest()
    return {"src": src, "classes": classes, "texts": texts, "label_offset": label_offset, "items": plan_items,
            "split_dirs": {"train": train_dir, "validation": validation_dir},
            "shards": shards, "skipped": skipped, "fingerprint": fingerprint}


def shard_ranges(n: int, num_shards: int) -> List[Tuple[int, int]]:
    """Contiguous [start, end) ranges of n records over num_shards (sizes differ by at most 1)."""
    return [(i * n // num_shards, (i + 1) * n // num_shards) for i in range(num_shards)]


# --------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------

def _state_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, STATE_DIR, name + ".json")


def _write_json(path: str, body: Dict[str, Any]) -> None:
    atomic_write(path, json.dumps(body, sort_keys=True))


def write_shard(task: Dict[str, Any]) -> Dict[str, Any]:
    """Write one shard (a worker's unit of work); returns its state: records, bytes,
    sha256, per-class counts, skipped files and re-encodings."""
    out_dir, name, strict = task["out_dir"], task["name"], task["strict"]
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, TEMP_PREFIX + name)
    classes, texts, offset = task["classes"], task["texts"], task["label_offset"]
    per_class: Dict[str, int] = {}
    reencoded: Dict[str, int] = {}
    skipped = []
    with open(tmp, "wb") as f:
        writer = tfrecord.RecordWriter(f)
        for path, c, boxes, xml in task["items"]:
            try:
                data, height, width, why = read_image(path, task["quality"], task["verify"])
                ref = None
                if xml:
                    ref, boxes = read_xml_boxes(xml)
                if boxes:
                    rotated = bool(why and "EXIF" in why)
                    boxes = normalize_boxes(boxes, ref or (_raw_size(path) if rotated else (width, height)))
                    if rotated:
                        boxes = orient_boxes(boxes, _raw_orientation(path))
            except (BadImage, ET.ParseError, OSError, ValueError) as e:
                reason = str(e) if isinstance(e, BadImage) else f"unreadable ({e})"
                rel = os.path.relpath(path, task["src"])
                if strict:
                    raise HrnetError(f"{rel}: {reason} (strict mode: stopping)") from None
                skipped.append({"split": task["split"], "path": rel, "reason": reason})
                continue
            # The bare file name ("n01440764_10026.JPEG"), as slim's build_imagenet_data.py stores it.
            writer.write(*schema.serialize_example(data, os.path.basename(path), c + offset, classes[c], texts[c],
                                                   height, width, boxes))
            per_class[classes[c]] = per_class.get(classes[c], 0) + 1
            if why:
                reencoded[why] = reencoded.get(why, 0) + 1
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the data does
    state = dict(path=name, bytes=writer.bytes, sha256=writer.sha256(), split=task["split"],
                 records=sum(per_class.values()), per_class=per_class, skipped=skipped, reencoded=reencoded,
                 fingerprint=task["fingerprint"])
    _write_json(_state_path(out_dir, name), state)
    os.replace(tmp, final)  # the shard appears complete or not at all
    return state


def _raw_size(path: str) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _raw_orientation(path: str) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return _orientation(image)


def _finished_state(out_dir: str, name: str, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The state of a shard a previous run completed for this same plan, else None."""
    final, state_path = os.path.join(out_dir, name), _state_path(out_dir, name)
    if not (os.path.exists(final) and os.path.exists(state_path)):
        return None
    try:
        with open(state_path) as f:
            state = json.load(f)
    except ValueError:
        return None
    if state.get("fingerprint") != fingerprint or state.get("bytes") != os.path.getsize(final):
        return None
    return state


def _check_output(out_dir: str, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The finished manifest when out_dir already holds this conversion; an error when it
    holds something else; None when the work is (still) to do."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        manifest = read_manifest(out_dir)
        if manifest.get("kind") == "tfrecords" and manifest.get("fingerprint") == fingerprint:
            return manifest
        what = manifest.get("source") or manifest.get("kind")
        raise HrnetError(f"output folder {out_dir} already holds a different data set ({what}); use an empty folder")
    plan_path = os.path.join(out_dir, STATE_DIR, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            previous = json.load(f).get("fingerprint")
        if previous != fingerprint:
            raise HrnetError(f"output folder {out_dir} holds an unfinished conversion of a different input or with "
                             "different options; use an empty folder")
        return None
    ours = (STATE_DIR, schema.LABELS_FILE) + storage.CONTROL_FILES
    foreign = [n for n in os.listdir(out_dir) if n not in ours and not n.startswith(TEMP_PREFIX)]
    if foreign:
        raise HrnetError("output folder {} is not empty ({}{}); use an empty folder".format(
            out_dir, ", ".join(sorted(foreign)[:3]), ", ..." if len(foreign) > 3 else ""))
    return None


def _run_tasks(tasks: List[Dict[str, Any]], workers: int, total: int, done: int, progress: bool):
    from tqdm import tqdm

    states = []
    with tqdm(total=total, initial=done, unit="img", desc="convert", disable=not progress,
              dynamic_ncols=True, mininterval=1.0) as bar:
        if workers <= 1:
            for task in tasks:
                states.append(write_shard(task))
                bar.update(len(task["items"]))
        else:
            import multiprocessing

            # spawn, not fork: TensorFlow's threads do not survive a fork.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for state in pool.imap_unordered(write_shard, tasks):
                    states.append(state)
                    bar.update(state["records"] + len(state["skipped"]))
    return states


def _local_source(src: str) -> str:
    """A local folder holding the image tree at ``src``. A remote tree that one of our steps
    published (demo-data) comes through the verified cache; a plain bucket of images has
    no manifest.json and is downloaded as it is."""
    if not storage.is_remote(src):
        return src
    try:
        return storage.local_input(src)
    except IncompleteError:
        local = storage.cache_path(src)
        storage.restore(src, local)
        return local


def convert_dataset(src: str, out: str, *, train_shards: Optional[int] = None,
                    validation_shards: Optional[int] = None, workers: Optional[int] = None,
                    label_offset: int = 0, train_dir: Optional[str] = None, validation_dir: Optional[str] = None,
                    val_labels: Optional[str] = None, devkit: Optional[str] = None,
                    synset_names: Optional[str] = None, bbox_dir: Optional[str] = None,
                    strict: bool = False, verify: bool = False, quality: int = 95,
                    seed: int = SHUFFLE_SEED, progress: bool = True, force: bool = False) -> Dict[str, Any]:
    """Convert the image tree at ``src`` into TFRecord shards in ``out``; returns the manifest.

    ``src`` holds ``train/`` and ``validation/`` (or ``val/``) as class folders, or a flat
    validation folder with ``val_labels`` (LOC_val_solution.csv, or the devkit's
    ILSVRC2012_validation_ground_truth.txt with ``devkit``; found in ``src`` when not
    given); Kaggle's ``ILSVRC/Data/CLS-LOC`` layout is found too. ``bbox_dir``: ImageNet
    XML boxes (matched by file name). ``label_offset`` 1 stores slim's 1..N labels.
    Re-running on the same ``out`` resumes (finished shards are kept).
    """
    storage.output_target(out)  # a bare bucket is refused before the input is read
    local = {k: storage.local_input(v) if v is not None and storage.is_remote(v) else v
             for k, v in dict(train_dir=train_dir, validation_dir=validation_dir, val_labels=val_labels,
                              devkit=devkit, synset_names=synset_names, bbox_dir=bbox_dir).items()}
    plan = make_plan(_local_source(src), train_shards=train_shards, validation_shards=validation_shards,
                     label_offset=label_offset, seed=seed, **local)
    refused = [s for s in plan["skipped"] if s["reason"] != HIDDEN]  # --strict is about images, not .DS_Store
    if strict and refused:
        first = refused[0]
        raise HrnetError("{}: {} (strict mode: stopping)".format(first["path"], first["reason"]))
    fingerprint = hashlib.sha256((plan["fingerprint"] + json.dumps([quality, verify])).encode()).hexdigest()
    with storage.local_output(out, kind="tfrecords", force=force) as out_dir:
        done = _check_output(out_dir, fingerprint)
        if done is not None:
            log.info("%s already holds this conversion; nothing to do", out)
            shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
            return done
        os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
        _write_json(os.path.join(out_dir, STATE_DIR, "plan.json"), {"fingerprint": fingerprint, "src": src})
        for name in os.listdir(out_dir):  # a killed run's half-written shards
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(out_dir, name))

        tasks, states, done_images, total = [], [], 0, 0
        for split, items in plan["items"].items():
            n = plan["shards"][split]
            for index, (start, end) in enumerate(shard_ranges(len(items), n)):
                name = schema.shard_name(split, index, n)
                total += end - start
                state = _finished_state(out_dir, name, fingerprint)
                if state is not None:
                    states.append(state)
                    done_images += end - start
                else:
                    tasks.append({"out_dir": out_dir, "name": name, "split": split, "items": items[start:end],
                                  "src": plan["src"], "split_dir": plan["split_dirs"][split],
                                  "classes": plan["classes"], "texts": plan["texts"],
                                  "label_offset": plan["label_offset"], "strict": strict, "verify": verify,
                                  "quality": quality, "fingerprint": fingerprint})
        if states:
            log.info("resuming: %d of %d shards already complete", len(states), len(states) + len(tasks))
        workers = min(workers or usable_cpus(), max(1, len(tasks)))
        states += _run_tasks(tasks, workers, total, done_images, progress)

        schema.write_labels_file(os.path.join(out_dir, schema.LABELS_FILE),
                                 [(i + plan["label_offset"], c, t)
                                  for i, (c, t) in enumerate(zip(plan["classes"], plan["texts"]))])
        manifest = _manifest(plan, states, src, out_dir, fingerprint, dict(
            train_shards=plan["shards"].get("train"), validation_shards=plan["shards"].get("validation"),
            quality=quality, verify=verify, seed=seed, bbox_dir=bool(bbox_dir)))
        lost = [c for c, n in manifest["counts_per_class"].get("train", {}).items() if n == 0]
        if lost:
            # As fatal as an empty class folder: a class with no training record is a broken data set.
            why = next((f"{s['path']}: {s['reason']}" for s in manifest["skipped"]
                        if s["split"] == "train" and os.path.basename(os.path.dirname(s["path"])) == lost[0]), "")
            raise HrnetError("class folder{} with no readable image: {} (every file was skipped{}); fix or remove "
                             "{}".format("s" if len(lost) > 1 else "", ", ".join(lost[:5]),
                                         f", e.g. {why}" if why else "", "them" if len(lost) > 1 else "it"))
        write_manifest(out_dir, manifest)
        manifest = read_manifest(out_dir)
        shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    log.info(summary_line(manifest))
    return manifest


def _manifest(plan, states, src, out_dir, fingerprint, options) -> Dict[str, Any]:
    states = sorted(states, key=lambda s: s["path"])
    counts, per_class, shards, reencoded = {}, {}, {}, {}
    skipped = list(plan["skipped"])
    for split in plan["items"]:
        mine = [s for s in states if s["split"] == split]
        counts[split] = sum(s["records"] for s in mine)
        per_class[split] = {c: sum(s["per_class"].get(c, 0) for s in mine) for c in plan["classes"]}
        shards[split] = [{k: s[k] for k in ("path", "records", "bytes", "sha256")} for s in mine]
        for s in mine:
            skipped.extend(s["skipped"])
            for why, n in s["reencoded"].items():
                reencoded[why] = reencoded.get(why, 0) + n
    return {
        "kind": "tfrecords",
        "format": "tf-slim imagenet (image/encoded JPEG, image/class/label, image/object/bbox/*)",
        "source": src,
        "num_classes": len(plan["classes"]),
        "label_offset": plan["label_offset"],
        "classes": plan["classes"],
        "counts": counts,
        "counts_per_class": per_class,
        "shards": shards,
        "labels_file": file_entry(os.path.join(out_dir, schema.LABELS_FILE), out_dir),
        "skipped": sorted(skipped, key=lambda s: (s["split"], s["path"])),
        "num_skipped": len(skipped),
        "reencoded": reencoded,
        "options": options,
        "fingerprint": fingerprint,
    }


def summary_line(manifest: Dict[str, Any]) -> str:
    counts = manifest["counts"]
    shards = manifest["shards"]
    parts = ", ".join(f"{counts[s]} {s} images in {len(shards[s])} shards" for s in counts)
    line = f"converted {parts}; {manifest['num_classes']} classes (labels from {manifest['label_offset']})"
    if manifest["reencoded"]:
        line += "; re-encoded " + ", ".join(f"{n} {k}" for k, n in sorted(manifest["reencoded"].items()))
    line += f"; {manifest['num_skipped']} skipped"
    if manifest["num_skipped"]:
        first = "; ".join(f"{s['path']}: {s['reason']}" for s in manifest["skipped"][:3])
        line += f" (listed in manifest.json: {first})"
    return line


def add_arguments(parser) -> None:
    parser.add_argument("--src", required=True,
                        help="image tree: train/<class>/*, validation/<class>/* (or val/, flat with a labels file)")
    parser.add_argument("--out", required=True, help="output folder or s3:// / minio:// URI")
    parser.add_argument("--train-shards", type=int, help="default: about 1250 images per shard (ImageNet: 1024)")
    parser.add_argument("--validation-shards", type=int, help="default: about 390 images per shard (ImageNet: 128)")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per CPU core)")
    parser.add_argument("--label-offset", type=int, choices=(0, 1), default=0,
                        help="1 stores slim's labels 1..N (0 = background); default 0 (labels 0..N-1)")
    parser.add_argument("--train-dir", help="train class folders, when not SRC/train")
    parser.add_argument("--validation-dir", help="validation folder, when not SRC/validation or SRC/val")
    parser.add_argument("--val-labels", help="labels of a flat validation folder: LOC_val_solution.csv, "
                        "ILSVRC2012_validation_ground_truth.txt or one synset per line")
    parser.add_argument("--devkit", help="ILSVRC2012 devkit folder or meta.mat (maps ground-truth IDs to synsets)")
    parser.add_argument("--synset-names", help="readable class names (LOC_synset_mapping.txt or synset_words.txt)")
    parser.add_argument("--bbox-dir", help="ImageNet bounding box XML folder (stored as image/object/bbox/*)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of skipping")
    parser.add_argument("--verify", action="store_true",
                        help="decode every image and check every JPEG's marker structure (slower; catches "
                             "corruption inside complete JPEGs that decoders pass with a warning)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    storage.add_force_argument(parser)


def run(args) -> int:
    convert_dataset(  # logs the summary line
        args.src, args.out, train_shards=args.train_shards, validation_shards=args.validation_shards,
        workers=args.workers, label_offset=args.label_offset, train_dir=args.train_dir,
        validation_dir=args.validation_dir, val_labels=args.val_labels, devkit=args.devkit,
        synset_names=args.synset_names, bbox_dir=args.bbox_dir, strict=args.strict, verify=args.verify,
        quality=args.quality, progress=not args.no_progress, force=args.force)
    return 0

"""Where the images of a source tree are, and the plan of a conversion: every input file,
its label and its shard, listed and checked before any work.

Takes folder-per-class splits (train/<class>/*, validation/<class>/*), a flat validation
folder with a labels file (LOC_val_solution.csv, the devkit's ground truth with meta.mat,
or one synset per line), and the ImageNet download layouts (Kaggle's ILSVRC/Data/CLS-LOC).
"""
import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from hrnet.data.images import Box
from hrnet.errors import HrnetError
from hrnet.storage.uris import local_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Images, but of a type the converter does not take (animated, multi-page, vector, HDR...).
OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".svg", ".ico", ".jp2", ".exr")
HIDDEN = "hidden file (system metadata), ignored"
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


def _is_image_name(name: str) -> bool:
    return (name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")
            and _utf8(name))


def _utf8(name: str) -> bool:
    """Whether a name the file system gave is valid UTF-8 (else Python holds its bytes as
    surrogates, which no record or manifest can store)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(path: str) -> str:
    """``path`` as text, its bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _raise(error: OSError) -> None:
    raise error  # os.walk would skip an unreadable folder without a word


def _walk_files(folder: str) -> List[str]:
    """Every file under ``folder``, following links to folders (a tree of links is a common
    way to assemble a data set), but not a link to a folder already read: a loop would list
    its files once per turn. Such a link is listed itself, as a file the plan skips."""
    found = []
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_raise):
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in seen:
                dirnames.remove(name)
                found.append(os.path.join(dirpath, name))
            seen.add(real)
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return found


def _scan_class_folders(split_dir: str) -> Tuple[Dict[str, List[str]], List[str]]:
    """({class folder: [image paths]}, [other files]) of a folder-per-class split."""
    classes, others = {}, []
    for entry in sorted(os.listdir(split_dir)):
        full = os.path.join(split_dir, entry)
        if os.path.isdir(full):
            if not _utf8(entry):
                raise HrnetError(f"the class folder {_printable(full)}: its name is not valid UTF-8 (a record stores "
                                 "it): rename it")
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


class Item(NamedTuple):
    """One input file of the plan (ImageNet has 1.3 million: a small tuple each)."""
    path: str
    label: int  # the class's index
    boxes: List[Box]  # pixel boxes from a labels file
    xml: Optional[str]  # its bounding box annotation


@dataclass
class Plan:
    """A conversion's whole input, checked: classes, and per split its items in record order
    (a fixed shuffle, as slim's) and shard count."""
    src: str
    classes: List[str]
    texts: List[str]
    label_offset: int
    items: Dict[str, List[Item]]
    shards: Dict[str, int]
    skipped: List[Dict[str, str]]
    fingerprint: str


def _split_dirs(src: str, roots: List[str], train_dir: Optional[str],
                validation_dir: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """The train and validation folders: as given, else found in one of the layouts."""
    if train_dir is None and validation_dir is None:
        for path in (os.path.join(r, name) for r in roots for name in ("train",) + VALIDATION_DIRS):
            if os.path.exists(path) and not os.path.isdir(path):
                raise HrnetError(f"{path} is a file, not a folder of class folders: move it away or pass "
                                 "--train-dir / --validation-dir")
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
    return train_dir, validation_dir


def _skip_reason(path: str, split_dir: str) -> str:
    """Why a file of a split that is not one of its images is skipped."""
    ext = os.path.splitext(path)[1].lower()
    if not _utf8(path):
        return "its name is not valid UTF-8 (a record stores the file name): rename it"
    if os.path.isdir(path):
        return "a link to a folder already read (a loop, or a second way to the same images): not followed"
    if os.path.dirname(path) == split_dir and _is_image_name(path):
        return "not inside a class folder"
    if os.path.basename(path).startswith("."):
        return HIDDEN  # .DS_Store, ._foo.jpg (macOS), .directory: no one's data
    if ext in OTHER_IMAGE_EXTENSIONS:
        return f"an image of a type the converter does not take ({ext}): convert it to JPEG or PNG"
    return "not an image file ({})".format(ext or "no extension")


def _split_items(split: str, split_dir: str, src: str, roots: List[str], val_labels: Optional[str],
                 devkit: Optional[str]) -> Tuple[List[Tuple[str, str, Any]], List[str], List[str]]:
    """([(path, class, pixel boxes)], its classes, the other files) of one split."""
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
        return items, sorted({c for _, c, _ in items}), [p for p in others if p not in labels]
    empty = [c for c, files in folders.items() if not files]
    if empty:
        raise HrnetError("{}: class folder{} without images: {}".format(
            split_dir, "s" if len(empty) > 1 else "", ", ".join(empty[:5])))
    if not folders:
        raise HrnetError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/<images>)")
    return [(p, c, None) for c, files in folders.items() for p in files], sorted(folders), others


def _xml_by_stem(bbox_dir: Optional[str]) -> Dict[str, str]:
    """Bounding box annotations by file stem (n01440764_10026 -> its XML)."""
    if bbox_dir is None:
        return {}
    if not os.path.isdir(bbox_dir):
        raise FileNotFoundError(f"no such bounding box folder: {bbox_dir}")
    return {os.path.splitext(os.path.basename(p))[0]: p for p in _walk_files(bbox_dir) if p.lower().endswith(".xml")}


def make_plan(src: str, *, train_dir: Optional[str] = None, validation_dir: Optional[str] = None,
              val_labels: Optional[str] = None, devkit: Optional[str] = None,
              synset_names: Optional[str] = None, bbox_dir: Optional[str] = None,
              train_shards: Optional[int] = None, validation_shards: Optional[int] = None,
              label_offset: int = 0, seed: int = SHUFFLE_SEED) -> Plan:
    """List and check the whole input; raise HrnetError for anything wrong before work starts."""
    if not os.path.isdir(src):
        local_path(src)  # a mistyped URI (s3:/...) is named as one
        raise FileNotFoundError(f"no such input folder: {src}")
    if label_offset not in (0, 1):
        raise ValueError("label_offset must be 0 (labels 0..N-1) or 1 (slim's 1..N, 0 = background)")
    roots = [os.path.join(src, r) if r else src for r in LAYOUT_ROOTS]
    split_dirs = dict(zip(("train", "validation"), _split_dirs(src, roots, train_dir, validation_dir)))
    skipped: List[Dict[str, str]] = []
    per_split, class_sets = {}, {}
    for split, split_dir in split_dirs.items():
        if split_dir is not None:
            per_split[split], class_sets[split], others = _split_items(split, split_dir, src, roots, val_labels,
                                                                       devkit)
            skipped += [{"split": split, "path": _printable(os.path.relpath(p, src)),
                         "reason": _skip_reason(p, split_dir)} for p in others]
    classes = class_sets.get("train") or class_sets["validation"]
    unknown = sorted(set(class_sets.get("validation", [])) - set(classes))
    if unknown:
        raise HrnetError("validation classes missing from train/: {}".format(", ".join(unknown[:5])))
    class_index = {c: i for i, c in enumerate(classes)}
    names_path = synset_names or _find_first([src] + roots, SYNSET_NAME_FILES)
    names = _read_synset_names(names_path) if names_path else {}
    xml_by_stem = _xml_by_stem(bbox_dir)
    shards, items = {}, {}
    for split, found in per_split.items():
        records = [Item(path, class_index[c], boxes or [], xml_by_stem.get(os.path.splitext(os.path.basename(path))[0]))
                   for path, c, boxes in found]
        records.sort()  # then a fixed shuffle (as slim's): each shard mixes classes, the same on every run
        random.Random(seed).shuffle(records)
        shards[split] = (train_shards if split == "train" else validation_shards) or _auto_shards(len(records), split)
        if shards[split] < 1:
            raise ValueError(f"{split}_shards must be at least 1")
        items[split] = records
    fingerprint = hashlib.sha256(json.dumps({
        "items": {s: [(os.path.relpath(i.path, src), i.label, i.xml and os.path.basename(i.xml)) for i in recs]
                  for s, recs in items.items()},
        "shards": shards, "label_offset": label_offset, "seed": seed,
    }, sort_keys=True).encode()).hexdigest()
    return Plan(src, classes, [names.get(c, c) for c in classes], label_offset, items, shards, skipped, fingerprint)

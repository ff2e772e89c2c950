"""Image trees (ImageNet layouts or folder-per-class) -> sharded TFRecords with slim's keys.

The input is planned by hrnet.data.layout and each image read by hrnet.data.images; this
module writes the shards. What is faster than slim's build_imagenet_data.py, and why:
- an RGB JPEG is stored byte for byte and its size read from the header (hrnet.data.images);
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
import contextlib
import hashlib
import json
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from hrnet import storage
from hrnet.data import schema, tfrecord
from hrnet.data.images import BadImage, record_image
from hrnet.data.layout import HIDDEN, SHUFFLE_SEED, Item, Plan, make_plan
from hrnet.errors import HrnetError, IncompleteError
from hrnet.fileio import atomic_write
from hrnet.manifest import MANIFEST, file_entry, read_manifest, write_manifest
from hrnet.runtime import usable_cpus

log = logging.getLogger(__name__)

STATE_DIR = ".convert"
TEMP_PREFIX = ".tmp-"
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


@dataclass
class Task:
    """One shard to write: a worker's unit of work (pickled to a spawned process)."""
    out_dir: str
    name: str
    split: str
    items: List[Item]
    src: str
    classes: List[str]
    texts: List[str]
    label_offset: int
    strict: bool
    verify: bool
    quality: int
    fingerprint: str


def write_shard(task: Task) -> Dict[str, Any]:
    """Write one shard; returns its state: records, bytes, sha256, per-class counts,
    skipped files and re-encodings."""
    tmp = os.path.join(task.out_dir, TEMP_PREFIX + task.name)
    per_class: Dict[str, int] = {}
    reencoded: Dict[str, int] = {}
    skipped = []
    with open(tmp, "wb") as f:
        writer = tfrecord.RecordWriter(f)
        for item in task.items:
            try:
                data, height, width, why, boxes = record_image(item.path, item.xml, item.boxes, task.quality,
                                                               task.verify)
            except (BadImage, ET.ParseError, OSError, ValueError) as e:
                reason = str(e) if isinstance(e, BadImage) else f"unreadable ({e})"
                rel = os.path.relpath(item.path, task.src)
                if task.strict:
                    raise HrnetError(f"{rel}: {reason} (strict mode: stopping)") from None
                skipped.append({"split": task.split, "path": rel, "reason": reason})
                continue
            name = task.classes[item.label]
            # The bare file name ("n01440764_10026.JPEG"), as slim's build_imagenet_data.py stores it.
            writer.write(*schema.serialize_example(data, os.path.basename(item.path), item.label + task.label_offset,
                                                   name, task.texts[item.label], height, width, boxes))
            per_class[name] = per_class.get(name, 0) + 1
            if why:
                reencoded[why] = reencoded.get(why, 0) + 1
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the data does
    state = dict(path=task.name, bytes=writer.bytes, sha256=writer.sha256(), split=task.split,
                 records=sum(per_class.values()), per_class=per_class, skipped=skipped, reencoded=reencoded,
                 fingerprint=task.fingerprint)
    _write_json(_state_path(task.out_dir, task.name), state)
    os.replace(tmp, os.path.join(task.out_dir, task.name))  # the shard appears complete or not at all
    return state


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


def _run_tasks(tasks: List[Task], workers: int, total: int, done: int, progress: bool):
    from tqdm import tqdm

    states = []
    with tqdm(total=total, initial=done, unit="img", desc="convert", disable=not progress,
              dynamic_ncols=True, mininterval=1.0) as bar:
        if workers <= 1:
            for task in tasks:
                states.append(write_shard(task))
                bar.update(len(task.items))
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
        return storage.fetch(src)


def _check_every_class_kept(manifest: Dict[str, Any]) -> None:
    """As fatal as an empty class folder: a class with no training record is a broken data set."""
    lost = [c for c, n in manifest["counts_per_class"].get("train", {}).items() if n == 0]
    if lost:
        why = next((f"{s['path']}: {s['reason']}" for s in manifest["skipped"]
                    if s["split"] == "train" and os.path.basename(os.path.dirname(s["path"])) == lost[0]), "")
        raise HrnetError("class folder{} with no readable image: {} (every file was skipped{}); fix or remove "
                         "{}".format("s" if len(lost) > 1 else "", ", ".join(lost[:5]),
                                     f", e.g. {why}" if why else "", "them" if len(lost) > 1 else "it"))


def _check_options(train_shards: Optional[int], validation_shards: Optional[int], workers: Optional[int],
                   quality: int) -> None:
    for name, value in (("train_shards", train_shards), ("validation_shards", validation_shards),
                        ("workers", workers)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1 to 100 (JPEG quality of re-encoded images), got {quality}")


def _begin(out_dir: str, fingerprint: str, src: str) -> None:
    """Mark ``out_dir`` as this conversion's, and drop a killed run's half-written shards."""
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    _write_json(os.path.join(out_dir, STATE_DIR, "plan.json"), {"fingerprint": fingerprint, "src": src})
    for name in os.listdir(out_dir):
        if name.startswith(TEMP_PREFIX):
            os.remove(os.path.join(out_dir, name))


def _unmake(out_dir: str, shards: List[str]) -> None:
    """Remove what this conversion wrote in ``out_dir``: its shards, labels file and state."""
    for name in shards + [schema.LABELS_FILE]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)


def _shard_work(plan: Plan, out_dir: str, fingerprint: str, strict: bool, verify: bool,
                quality: int) -> Tuple[List[Task], List[Dict[str, Any]], int, int]:
    """(shards to write, states of the shards a killed run finished, their images, all images)."""
    tasks, states, done, total = [], [], 0, 0
    for split, items in plan.items.items():
        n = plan.shards[split]
        for index, (start, end) in enumerate(shard_ranges(len(items), n)):
            name = schema.shard_name(split, index, n)
            total += end - start
            state = _finished_state(out_dir, name, fingerprint)
            if state is not None:
                states.append(state)
                done += end - start
            else:
                tasks.append(Task(out_dir, name, split, items[start:end], plan.src, plan.classes, plan.texts,
                                  plan.label_offset, strict, verify, quality, fingerprint))
    return tasks, states, done, total


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
    _check_options(train_shards, validation_shards, workers, quality)
    storage.output_target(out)  # a bare bucket is refused before the input is read
    local = {k: storage.local_input(v) if v is not None and storage.is_remote(v) else v
             for k, v in dict(train_dir=train_dir, validation_dir=validation_dir, val_labels=val_labels,
                              devkit=devkit, synset_names=synset_names, bbox_dir=bbox_dir).items()}
    plan = make_plan(_local_source(src), train_shards=train_shards, validation_shards=validation_shards,
                     label_offset=label_offset, seed=seed, **local)
    refused = [s for s in plan.skipped if s["reason"] != HIDDEN]  # --strict is about images, not .DS_Store
    if strict and refused:
        first = refused[0]
        raise HrnetError("{}: {} (strict mode: stopping)".format(first["path"], first["reason"]))
    fingerprint = hashlib.sha256((plan.fingerprint + json.dumps([quality, verify])).encode()).hexdigest()
    with storage.local_output(out, kind="tfrecords", force=force) as out_dir:
        done = _check_output(out_dir, fingerprint)
        if done is not None:
            log.info("%s already holds this conversion; nothing to do", out)
            shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
            return done
        _begin(out_dir, fingerprint, src)
        tasks, states, done_images, total = _shard_work(plan, out_dir, fingerprint, strict, verify, quality)
        if states:
            log.info("resuming: %d of %d shards already complete", len(states), len(states) + len(tasks))
        workers = min(workers or usable_cpus(), max(1, len(tasks)))
        states += _run_tasks(tasks, workers, total, done_images, progress)

        schema.write_labels_file(os.path.join(out_dir, schema.LABELS_FILE),
                                 [(i + plan.label_offset, c, t)
                                  for i, (c, t) in enumerate(zip(plan.classes, plan.texts))])
        manifest = _manifest(plan, states, src, out_dir, fingerprint, dict(
            train_shards=plan.shards.get("train"), validation_shards=plan.shards.get("validation"),
            quality=quality, verify=verify, seed=seed, bbox_dir=bool(bbox_dir)))
        try:
            _check_every_class_kept(manifest)
        except HrnetError:
            # Its own shards go, so that the fixed tree converts here: a conversion of it would
            # be refused as "an unfinished conversion of a different input".
            _unmake(out_dir, [state["path"] for state in states])
            raise
        write_manifest(out_dir, manifest)
        manifest = read_manifest(out_dir)
        shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    log.info(summary_line(manifest))
    return manifest


def _manifest(plan, states, src, out_dir, fingerprint, options) -> Dict[str, Any]:
    states = sorted(states, key=lambda s: s["path"])
    counts, per_class, shards, reencoded = {}, {}, {}, {}
    skipped = list(plan.skipped)
    for split in plan.items:
        mine = [s for s in states if s["split"] == split]
        counts[split] = sum(s["records"] for s in mine)
        per_class[split] = {c: sum(s["per_class"].get(c, 0) for s in mine) for c in plan.classes}
        shards[split] = [{k: s[k] for k in ("path", "records", "bytes", "sha256")} for s in mine]
        for s in mine:
            skipped.extend(s["skipped"])
            for why, n in s["reencoded"].items():
                reencoded[why] = reencoded.get(why, 0) + n
    return {
        "kind": "tfrecords",
        "format": "tf-slim imagenet (image/encoded JPEG, image/class/label, image/object/bbox/*)",
        "source": src,
        "num_classes": len(plan.classes),
        "label_offset": plan.label_offset,
        "classes": plan.classes,
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

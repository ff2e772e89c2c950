"""``hrnet predict``: the top-k classes of images, with an exported model.

    hrnet predict --model EXPORT [--top-k 5] [--batch-size 32] [--format csv|json] [--output FILE] INPUT...

INPUT: image files, folders (every image file below them, sorted) and s3:// URIs (an object,
or a prefix and every image below it). Images are read a batch at a time, so a folder of any
size fits in memory. One row per image, in input order: CSV (``path,class_1,name_1,
probability_1,...,error``) or JSON Lines (``{"path", "classes", "names", "probabilities"}`` or
``{"path", "error"}``). An image the model cannot decode is a row with its error, counted in
the summary line; it does not stop the others.
"""
import csv
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

from hrnet import storage
from hrnet.errors import HrnetError

log = logging.getLogger(__name__)

FORMATS = ("csv", "json")


def _image_names() -> Tuple[str, ...]:
    from hrnet.data.layout import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS + (".gif",)  # what TensorFlow's decoder reads


@dataclass(frozen=True)
class Source:
    path: str  # as the output names it
    read: Callable[[], bytes]


def _local_file(path: str) -> Source:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return Source(path, read)


def _remote_file(uri: str) -> Source:
    return Source(uri, lambda: storage.read_bytes(uri))


def find_sources(inputs: List[str]) -> Tuple[List[Source], int]:
    """The images the inputs name, and how many files below the folders were left out for a
    name that is not an image's. A file named on its own is always tried."""
    found: List[Source] = []
    skipped = 0
    names = _image_names()
    for item in inputs:
        if storage.is_remote(item):
            below = storage.list_files(item)
            if not below:  # not a prefix: the object itself (a missing one fails when read)
                found.append(_remote_file(item))
            for rel in below:
                if rel.lower().endswith(names):
                    found.append(_remote_file(item.rstrip("/") + "/" + rel))
                else:
                    skipped += 1
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(names) and not name.startswith("."):
                        found.append(_local_file(os.path.join(root, name)))
                    else:
                        skipped += 1
        elif os.path.isfile(item):
            found.append(_local_file(item))
        else:
            raise FileNotFoundError("no such image file or folder: %s" % item)
    return found, skipped


def _batches(sources: List[Source], size: int) -> Iterator[List[Source]]:
    for i in range(0, len(sources), size):
        yield sources[i:i + size]


class _Writer:
    """CSV or JSON Lines rows, one per image."""

    def __init__(self, stream, fmt: str, top_k: int):
        self.stream, self.fmt, self.top_k = stream, fmt, top_k
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["path"] + [f"{c}_{i}" for i in range(1, top_k + 1)
                                          for c in ("class", "name", "probability")] + ["error"])

    def row(self, path: str, result) -> None:
        from hrnet.serving.exported import BadImage

        bad = isinstance(result, BadImage)
        if self.fmt == "json":
            body = {"path": path, "error": result.reason} if bad else dict(path=path, **_top(result, self.top_k))
            self.stream.write(json.dumps(body) + "\n")
            return
        cells = [""] * (3 * self.top_k) if bad else [
            v for c, n, p in zip(result.classes, result.names, result.probabilities)
            for v in (c, n, "%.6f" % p)][:3 * self.top_k]
        self.csv.writerow([path] + cells + [result.reason if bad else ""])


def _top(prediction, k: int):
    return {"classes": prediction.classes[:k], "names": prediction.names[:k],
            "probabilities": prediction.probabilities[:k]}


def predict(model: str, inputs: List[str], out, fmt: str = "csv", top_k: int = 5, batch_size: int = 32,
            progress: bool = True, runtime: str = "auto") -> Tuple[int, int]:
    """Write a row per image to ``out``; returns (images classified, images that could not be)."""
    from tqdm import tqdm

    from hrnet.serving.exported import BadImage, Exported

    if batch_size < 1 or top_k < 1:
        raise ValueError("--batch-size and --top-k must be >= 1, got %d and %d" % (batch_size, top_k))
    sources, skipped = find_sources(inputs)
    if not sources:
        raise HrnetError("no image files in %s" % ", ".join(inputs))
    exported = Exported(model, runtime)
    if top_k > exported.top_k:
        raise ValueError("--top-k %d: the export gives the top %d" % (top_k, exported.top_k))
    writer = _Writer(out, fmt, top_k)
    good = bad = 0
    first_bad = None
    with tqdm(total=len(sources), unit="img", desc="predict", disable=not progress or len(sources) <= batch_size,
              file=sys.stderr, mininterval=1.0) as bar:
        for batch in _batches(sources, batch_size):
            for source, result in zip(batch, exported.classify([s.read() for s in batch])):
                writer.row(source.path, result)
                if isinstance(result, BadImage):
                    bad += 1
                    first_bad = first_bad or "%s: %s" % (source.path, result.reason)
                else:
                    good += 1
            bar.update(len(batch))
    print("hrnet predict: %d images classified%s%s" % (
        good, ", %d could not be read (first: %s)" % (bad, first_bad) if bad else "",
        ", %d files below the folders left out (not an image's name)" % skipped if skipped else ""),
        file=sys.stderr)
    return good, bad


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or s3:// URIs")
    parser.add_argument("--model", required=True, help="the export (folder or URI) of `hrnet export`")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per call (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="csv",
                        help="csv, or json: one JSON object per line (default: %(default)s)")
    parser.add_argument("--output", "-o", help="write the rows to this file (default: standard output)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_runtime_argument(parser)


def add_runtime_argument(parser) -> None:
    from hrnet.serving.runtimes import RUNTIMES

    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="what runs the network: the SavedModel, ONNX Runtime on model.onnx, or auto: the "
                             "faster of the two on this machine where their logits agree (default: %(default)s)")


def run(args) -> int:
    import contextlib

    with (open(args.output, "w", newline="") if args.output else contextlib.nullcontext(sys.stdout)) as out:
        good, _ = predict(args.model, args.inputs, out, args.format, args.top_k, args.batch_size, args.progress,
                            args.runtime)
    if not good:
        print("hrnet predict: error: none of the images could be read", file=sys.stderr)
        return 2
    return 0

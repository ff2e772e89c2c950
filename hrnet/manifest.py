"""manifest.json: what a step produced, written last.

Every step (convert, train, evaluate, export) writes a manifest.json beside its outputs
once they are complete: what it is (``kind``), counts, config, and the size and sha256 of
each file. A reader that finds no manifest treats the output as incomplete.
"""
import json
import os
import time
from typing import Any, Dict, Optional

from hrnet.errors import HrnetError, IncompleteError
from hrnet.fileio import atomic_write, file_digest

MANIFEST = "manifest.json"


def file_entry(path: str, root: str) -> Dict[str, Any]:
    """{'path', 'bytes', 'sha256'} of a file, its path relative to root."""
    return {"path": os.path.relpath(path, root).replace(os.sep, "/"),
            "bytes": os.path.getsize(path), "sha256": file_digest(path)}


def write_manifest(directory: str, manifest: Dict[str, Any]) -> str:
    """Write ``directory/manifest.json`` atomically."""
    if "kind" not in manifest:
        raise ValueError("a manifest needs a 'kind'")
    body = dict(manifest)
    body.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            found = json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
        found = manifest["kind"]
    if found != manifest["kind"]:
        # The last line of defence: one output is never turned into another kind.
        raise HrnetError("%s holds a %r output; refusing to replace its %s with a %r one"
                         % (directory, found, MANIFEST, manifest["kind"]))
    return atomic_write(path, json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: str, kind: Optional[str] = None) -> Dict[str, Any]:
    """The manifest of a finished output; IncompleteError if there is none."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError("no such directory: %s" % directory)
    if not os.path.exists(path):
        raise IncompleteError(
            "%s has no %s: it is incomplete (still being written, or its writer died)" % (directory, MANIFEST)
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise HrnetError("%s is not a valid manifest (%s): the output is damaged; make it again" % (path, e)) from None
    if not isinstance(manifest, dict):
        raise HrnetError("%s is not a valid manifest (not a JSON object): the output is damaged; make it again" % path)
    if kind is not None and manifest.get("kind") != kind:
        raise IncompleteError("%s holds a %r, not a %r" % (directory, manifest.get("kind"), kind))
    return manifest

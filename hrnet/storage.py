"""Object storage (s3:// and minio:// URIs) and local paths behind one small API.

Steps take URIs for their inputs and outputs and work on local paths:

    data_dir = storage.local_input(uri)          # a local copy, verified (cached)
    with storage.local_output(uri) as out_dir:   # written locally, published on exit
        ...
    storage.mirror(local_dir, uri)               # push new/changed files (checkpoints)
    storage.restore(uri, local_dir)              # pull what a previous pod left

For local paths all of these are no-ops that return the path itself.
"""
import contextlib
import os
from typing import Iterator, Optional

REMOTE_SCHEMES = ("s3://", "minio://")


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def _not_yet(uri: str):
    raise NotImplementedError("object storage is not implemented yet: %s" % uri)


def local_input(uri: str, cache_dir: Optional[str] = None) -> str:
    """A local folder holding the complete output at ``uri`` (its manifest.json present)."""
    if is_remote(uri):
        _not_yet(uri)
    return uri


@contextlib.contextmanager
def local_output(uri: str, cache_dir: Optional[str] = None) -> Iterator[str]:
    """A local folder to write an output into; for a remote ``uri`` it is uploaded when
    the block exits without error, manifest.json last."""
    if is_remote(uri):
        _not_yet(uri)
    os.makedirs(uri, exist_ok=True)
    yield uri


def mirror(local_dir: str, uri: str) -> None:
    """Upload what changed in ``local_dir`` to ``uri`` (no-op when uri is local_dir)."""
    if is_remote(uri):
        _not_yet(uri)


def restore(uri: str, local_dir: str) -> None:
    """Download what ``uri`` holds into ``local_dir`` (resume on another node)."""
    if is_remote(uri):
        _not_yet(uri)

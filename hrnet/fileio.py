"""Local files written whole or not at all, and their digests: the one place for both.

A reader (a resumed trainer, HCCL reading its rank table, the uploader, a person) sees the
old file or the new one, never half of one. The temporary file has one suffix everywhere,
so that hrnet.storage can leave a killed writer's leftovers out of every upload.
"""
import contextlib
import hashlib
import os
from typing import Iterator, Union

PARTIAL_SUFFIX = ".part.hrnet"
_BLOCK = 1 << 20


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write; when the block ends without an error it is
    flushed to disk and renamed over ``path``, and otherwise removed."""
    tmp = path + PARTIAL_SUFFIX
    try:
        yield tmp
        fsync(tmp)  # the rename must not reach the disk before the data does
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: Union[str, bytes]) -> str:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (the owner of a folder or lease that
    names it); one of another user counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True

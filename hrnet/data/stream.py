"""Shards read straight from object storage with bounded local disk (``ShardStream``), or
from a local folder (``LocalShards``), in the order the input pipeline reads them.

ImageNet's train split is ~140 GB; staging it whole before step 1 took minutes to tens of
minutes and a pod with that much disk. A stream fetches this worker's shards in the order of
its epochs (hrnet.data.input asks for them one by one), a bounded number of bytes ahead, in
a background thread, each checked against the manifest's size and sha256 as it arrives, and
deletes each once the pipeline has read it to the end. Where the worker's whole share fits
in the bound, each shard is fetched once and kept for every later epoch.

The pipeline holds at most ``open_files`` shards open at a time (its interleave's cycle
length), so a bound of (open_files + 1) x the largest shard never deadlocks: the fetcher can
always fetch the next shard the pipeline waits for. A smaller bound is refused up front.
"""
import atexit
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

from hrnet import storage
from hrnet.errors import HrnetError
from hrnet.fileio import process_alive
from hrnet.runtime import cluster
from hrnet.storage.settings import settings_from_env

log = logging.getLogger(__name__)

GB = 1000 ** 3
# The default bound per server, which the pipeline's train pod is sized from.
DATA_CACHE_GB = float(cluster.DATA_CACHE_GB)

_open: List["ShardStream"] = []  # this process's streams: their wait for progress lines; closed at exit
_failures: List[Exception] = []  # what the fetchers could not fetch, first first
_waited = [0.0]  # seconds every stream of this process made its pipeline wait, closed ones too


def raise_failure() -> None:
    """Where a stream of this process failed, raise why (the shard named): called where TF
    reports the pipeline's end as an error of its own, without it."""
    if _failures:
        raise _failures[0] from None


def waited() -> float:
    """Seconds this process's input pipelines have waited for streamed shards, in all."""
    return _waited[0]


def close_all() -> None:
    for s in list(_open):
        s.close()


atexit.register(close_all)


def private_dir(split: str) -> str:
    """A new folder for one stream's shards, under this process's own folder of the cache;
    the folders of processes on this host that died (killed: no atexit) are removed."""
    root = os.path.join(storage.cache_root(), "s3-stream")
    host = socket.gethostname()
    if os.path.isdir(root):
        for name in os.listdir(root):
            owner, _, pid = name.rpartition("-")
            if owner == host and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    mine = os.path.join(root, f"{host}-{os.getpid()}")
    os.makedirs(mine, exist_ok=True)
    return tempfile.mkdtemp(prefix=split + "-", dir=mine)


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the data set's top
    size: int
    sha256: str


class LocalShards:
    """Shards already on this machine, handed out as they are."""

    streams = False

    def __init__(self, paths: List[str], order: Callable[[int], List[int]]):
        self.paths, self.order = paths, order

    def epoch(self, epoch: int) -> Iterator[bytes]:
        for i in self.order(epoch):
            yield self.paths[i].encode()

    def release(self, path: bytes) -> None:
        pass


class ShardStream:
    """This worker's shards of one split, fetched from ``uri`` (the data set's top) into
    ``local_dir`` (private to this process: deleted by ``close``) as the epochs from
    ``first_epoch`` on will read them (``order(epoch)``: indexes into ``shards``), at most
    ``budget`` bytes on disk at any time. ``epochs``: how many (None: for ever)."""

    streams = True

    def __init__(self, uri: str, split: str, shards: List[Shard], local_dir: str, budget: int,
                 order: Callable[[int], List[int]], open_files: int, first_epoch: int = 0,
                 epochs: Optional[int] = None):
        largest = max(s.size for s in shards)
        at_once = min(open_files, len(shards))
        need = (at_once + 1) * largest
        if budget < need:
            raise HrnetError(f"{budget / GB:.6g} GB of local disk (this process's share of --data-cache-gb) is too "
                             f"small to stream {uri}: the input reads {at_once} shards at a time, of up to "
                             f"{largest / 1e6:.3g} MB each; give it at least {need / GB:.6g} GB")
        self.uri, self.shards, self.local_dir, self.budget = uri.rstrip("/"), shards, local_dir, budget
        self.order, self.first_epoch, self.epochs = order, first_epoch, epochs
        self.keep = sum(s.size for s in shards) <= budget  # the whole share fits: fetch each shard once
        self.used = self.peak = 0
        self.waited = 0.0  # seconds the pipeline waited for a shard
        self.fetched = 0
        self._released = 0
        self._next = 0  # the next schedule position the pipeline asks for
        self.error: Optional[Exception] = None
        self._ready: Dict[int, str] = {}  # schedule position (keep mode: shard index) -> local path
        self._sizes: Dict[str, int] = {}  # local path -> bytes, of the files on disk
        self._cond = threading.Condition()
        self._closed = False
        os.makedirs(local_dir, exist_ok=True)
        log.info("streaming %d %s shards (%.4g GB) from %s, at most %.4g GB on disk at a time%s", len(shards), split,
                 sum(s.size for s in shards) / GB, self.uri, budget / GB,
                 " (all of them fit: each fetched once)" if self.keep else "")
        _open.append(self)
        self._thread = threading.Thread(target=self._fetch_all, daemon=True, name="hrnet-shard-stream")
        self._thread.start()

    # -- the fetcher
    def _schedule(self) -> Iterator[int]:
        epoch = self.first_epoch
        while self.epochs is None or epoch < self.first_epoch + self.epochs:
            yield from self.order(epoch)
            epoch += 1
            if self.keep:
                return  # every shard is fetched in the first epoch, and kept

    def _fetch_all(self) -> None:
        """Reserve each shard's bytes in the order it will be read (so the next shard the
        pipeline waits for is never stuck behind later ones), and download several at once:
        per-request latency, not bandwidth, bounds one connection on small shards."""
        workers = max(1, settings_from_env().workers)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="hrnet-shard-fetch") as pool:
                for position, index in enumerate(self._schedule()):
                    shard = self.shards[index]
                    with self._cond:
                        while (self.used and self.used + shard.size > self.budget and not self._closed
                               and self.error is None):
                            self._cond.wait()
                        if self._closed or self.error is not None:
                            return
                        self.used += shard.size
                        self.peak = max(self.peak, self.used)
                    pool.submit(self._fetch, index if self.keep else position, shard)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        """Hand a failure to the pipeline, which names it in one line."""
        with self._cond:
            if self.error is None:
                self.error = exc
                _failures.append(exc)
            self._cond.notify_all()

    def _fetch(self, key: int, shard: Shard) -> None:
        name = os.path.basename(shard.path)
        path = os.path.join(self.local_dir, name if self.keep else f"{key}-{name}")
        try:
            if not self._closed:
                storage.get_object(f"{self.uri}/{shard.path}", path, shard.size, shard.sha256)
        except Exception as exc:
            with self._cond:
                self.used -= shard.size
            self._fail(exc)
            return
        with self._cond:
            self._sizes[path] = shard.size
            self.fetched += 1
            self._ready[key] = path
            self._cond.notify_all()

    # -- what the pipeline calls
    def epoch(self, epoch: int) -> Iterator[bytes]:
        """The local paths of one epoch's shards, each once it is here."""
        n = len(self.order(epoch))
        start = (epoch - self.first_epoch) * n
        if start != self._next:
            # A dataset iterated twice: its shards were read (and deleted) the first time.
            raise HrnetError(f"epoch {epoch} of {self.uri} asked for out of order: a streamed input is read once")
        for k, index in enumerate(self.order(epoch)):
            position = start + k
            self._next = position + 1
            key = index if self.keep else position  # a kept shard serves every epoch
            began = time.monotonic()
            with self._cond:
                while key not in self._ready and self.error is None and not self._closed:
                    self._cond.wait()
                if self.error is not None:
                    raise self.error
                path = self._ready[key] if self.keep else self._ready.pop(key)
            self.waited += time.monotonic() - began
            _waited[0] += time.monotonic() - began
            yield path.encode()

    def release(self, path: bytes) -> None:
        """The pipeline read ``path`` to its end: delete it, unless every shard is kept; the
        last file of a finite schedule (an evaluation's one pass) closes the stream."""
        self._released += 1
        if not self.keep:
            path = path.decode()
            with self._cond:
                size = self._sizes.pop(path, 0)
            try:
                os.remove(path)
            finally:
                with self._cond:
                    self.used -= size
                    self._cond.notify_all()
        if self.epochs is not None and self._released == self.epochs * len(self.order(self.first_epoch)):
            self.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        shutil.rmtree(self.local_dir, ignore_errors=True)
        if self in _open:
            _open.remove(self)

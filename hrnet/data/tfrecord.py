"""TFRecord files of tf.train.Example records, written without TensorFlow.

The converter's worker processes write them. Importing TensorFlow cost each worker about
3 s, most of a small conversion's time, and workers with TensorFlow loaded converted 2812
images/s at steady state on 2 cores where these do 4085 (benchmarks/convert_throughput.py;
in one process, 15% less time per record). Both formats are small and fixed, so they are
written here:

- a TFRecord is, per record, its length (uint64 LE), the masked CRC-32C of those 8 bytes,
  the bytes and their masked CRC-32C (``tensorflow/core/lib/io/record_writer.cc``);
- an Example is protobuf's wire format of ``Features.feature``'s map entries, in key order
  as ``SerializeToString(deterministic=True)`` writes them; int64 and float lists packed.

tests/test_tfrecord.py checks both byte for byte against TensorFlow's own writer and
messages, and that TensorFlow reads the files back. The CRC is google-crc32c's (its C
extension: the pure-Python fallback would be slower than TensorFlow).
"""
import hashlib
import struct
from typing import BinaryIO, Dict, Iterable, Tuple

import google_crc32c

_MASK_DELTA = 0xA282EAD8
_UINT64 = (1 << 64) - 1
Pieces = Tuple[bytes, ...]


def _masked(crc: int) -> bytes:
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:  # most lengths and labels
        return bytes((n,))
    n &= _UINT64  # a negative int64 is its two's complement: ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, *pieces: bytes) -> Pieces:
    """A length-delimited field (wire type 2) ``tag`` holding ``pieces``, as pieces: an
    image's bytes are written as they were read, never copied into a bigger string."""
    return (bytes((tag << 3 | 2,)) + _varint(sum(map(len, pieces))),) + pieces


# Feature's oneof: bytes_list = 1, float_list = 2, int64_list = 3; each list's values are field 1.

def bytes_feature(value: bytes) -> Pieces:
    return _field(1, *_field(1, value))


def float_feature(values: Iterable[float]) -> Pieces:
    values = list(values)
    return _field(2, *(_field(1, struct.pack("<%df" % len(values), *values)) if values else ()))


def int64_feature(values: Iterable[int]) -> Pieces:
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(3, *(_field(1, packed) if packed else ()))


def example(features: Dict[str, Pieces]) -> Pieces:
    """A serialized tf.train.Example of ``{key: *_feature(...)}``, as pieces to join or to
    hand to RecordWriter.write."""
    entries = []
    for key in sorted(features):
        entries += _field(1, *_field(1, key.encode("utf-8")), *_field(2, *features[key]))
    return _field(1, *entries)


def _coalesced(pieces: Pieces, big: int = 4096):
    """``pieces`` with each run of small ones joined: one call per chunk to the file, the
    hash and the CRC, and no copy of a big one."""
    run = []
    for piece in pieces:
        if len(piece) < big:
            run.append(piece)
            continue
        if run:
            yield b"".join(run)
            run = []
        yield piece
    if run:
        yield b"".join(run)


class RecordWriter:
    """Appends records to an open binary file in TFRecord framing, keeping the sha256 and
    size of what it wrote (the manifest's, without reading the file again)."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self._sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, *pieces: bytes) -> None:
        """One record: the concatenation of ``pieces``."""
        chunks = list(_coalesced(pieces))
        n = sum(map(len, chunks))
        length = struct.pack("<Q", n)
        crc = 0
        for chunk in chunks:
            crc = google_crc32c.extend(crc, chunk)
        for part in (length + _masked(google_crc32c.value(length)), *chunks, _masked(crc)):
            self._file.write(part)
            self._sha256.update(part)
        self.bytes += n + 16

    def sha256(self) -> str:
        return self._sha256.hexdigest()

"""The per-shard record index: where each record of a TFRecord shard starts, and its size.

One text line per record, in file order: `"{offset} {length}\\n"`, both in bytes, the
length being the whole framed record (12-byte header, the serialized Example, 4-byte
CRC). It is the `.idx` format of DALI's TFRecord reader (`tfrecord2idx`) and of the
`tfrecord` package, so those read our shards with random access as they are, and
`pipelines.dataset` seeks straight to record i of a shard with one ranged read.

The index files live under `index/shards/`, not beside the shards in `data/`: a user's
glob such as `data/train-*` must keep matching only TFRecord files.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import google_crc32c

INDEX_FOLDER = "index/shards"
HEADER_BYTES = 12  # uint64 length + masked CRC32C of the length
FOOTER_BYTES = 4  # masked CRC32C of the data


def index_path(shard_path: str) -> str:
    """A shard's path relative to the output root (`data/NAME`) -> its index's path."""
    return f"{INDEX_FOLDER}/{shard_path.rsplit('/', 1)[-1]}.idx"


def framed_length(record_length: int) -> int:
    """Bytes a record of `record_length` takes in a TFRecord file."""
    return HEADER_BYTES + record_length + FOOTER_BYTES


def format_index(lengths: Iterable[int]) -> str:
    """The framed lengths of a shard's records, in file order -> the index file's text."""
    lines, offset = [], 0
    for length in lengths:
        lines.append(f"{offset} {length}\n")
        offset += length
    return "".join(lines)


def parse_index(text: str) -> list[tuple[int, int]]:
    """An index file's text -> [(offset, length)]. ValueError if a line is not two
    non-negative integers, or the records overlap or leave gaps (not an index of ours)."""
    entries, expected = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise ValueError(f"record index line {number}: {line!r} is not 'offset length'")
        offset, length = int(fields[0]), int(fields[1])
        if offset != expected or length < HEADER_BYTES + FOOTER_BYTES:
            raise ValueError(f"record index line {number}: record at {offset} of {length} "
                             f"bytes, expected one at {expected}")
        entries.append((offset, length))
        expected = offset + length
    return entries


def unframe(framed: bytes) -> bytes:
    """One framed TFRecord record (as an index entry spans it) -> its data, both CRCs
    checked: a ranged read of the wrong bytes (a stale index, a rewritten shard) fails
    here instead of parsing as a wrong image. ValueError if they do not match."""
    if len(framed) < HEADER_BYTES + FOOTER_BYTES:
        raise ValueError(f"truncated TFRecord record ({len(framed)} bytes)")
    length, length_crc = struct.unpack("<QI", framed[:HEADER_BYTES])
    if length_crc != _masked_crc(framed[:8]):
        raise ValueError("TFRecord length CRC mismatch: not a record boundary")
    if framed_length(length) != len(framed):
        raise ValueError(f"TFRecord record of {length} bytes does not fill its index entry "
                         f"of {len(framed)}")
    data = framed[HEADER_BYTES:HEADER_BYTES + length]
    if struct.unpack("<I", framed[-FOOTER_BYTES:])[0] != _masked_crc(data):
        raise ValueError("TFRecord data CRC mismatch: corrupt record")
    return data


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

"""Side files that carry encoded images from the decode stage to the shard writers.

Why: on the DirectRunner everything that crosses a GroupByKey is held in memory,
so shuffling image bytes makes peak memory grow with the dataset (TFDS documents
exactly this). Instead each decode bundle appends its encoded images to one
spill file and passes on a small `SpillRef`; only refs cross the shuffle, and
shard writers read the bytes back by offset. A retried bundle writes a new file
under a new name, so refs from committed bundles always point at complete bytes.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import defaultdict
from collections.abc import Iterable

from apache_beam.io.filesystems import FileSystems


@dataclasses.dataclass(frozen=True)
class SpillRef:
    path: str
    offset: int
    length: int


class SpillWriter:
    """Appends blobs to one new file under `directory`; opened on first write."""

    def __init__(self, directory: str):
        self._path = FileSystems.join(directory, f"{uuid.uuid4().hex}.spill")
        self._handle = None
        self._offset = 0

    def append(self, blob: bytes) -> SpillRef:
        if self._handle is None:
            self._handle = FileSystems.create(self._path)
        self._handle.write(blob)
        ref = SpillRef(self._path, self._offset, len(blob))
        self._offset += len(blob)
        return ref

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_spilled(refs: Iterable[SpillRef]) -> dict[SpillRef, bytes]:
    """Reads blobs back, one open per spill file, in offset order (sequential reads)."""
    by_path: dict[str, list[SpillRef]] = defaultdict(list)
    for ref in refs:
        by_path[ref.path].append(ref)
    blobs = {}
    for path, path_refs in by_path.items():
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for ref in sorted(path_refs, key=lambda r: r.offset):
                handle.seek(ref.offset)
                blobs[ref] = handle.read(ref.length)
    return blobs

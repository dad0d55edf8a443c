"""`ImageShards`: random access to one split of a preprocess output, without TensorFlow.

    ImageShards(uri, split)[i]
      manifest.json -> the split's shards and their record counts (i -> shard, record j)
      index/shards/NAME.idx -> (offset, length) of record j   (read once per shard)
      one ranged read of those bytes -> TFRecord frame, CRCs checked
      -> tf.train.Example parsed (pipelines.contract.records) -> pixels (Pillow / NumPy)

Ranged reads: local files with `os.pread`; `gs://` objects with google-cloud-storage
ranged downloads (Beam's GCS reader fetches a whole read buffer per seek); other Beam
filesystems through `FileSystems.open` and a seek.

Safe to pickle and to use after `fork` (PyTorch and Grain worker processes): open files
and storage clients are made per process, on first use.
"""

from __future__ import annotations

import bisect
import io
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipelines.contract import record_index, records
from pipelines.contract.manifest import join, read_manifest
from pipelines.dataset import order

Example = dict[str, Any]


def decode_image(encoded: bytes, image_format: str, height: int, width: int) -> np.ndarray:
    """Stored image bytes -> uint8 [height, width, 3], as the trainer's `decode_stored`
    (Pillow decodes JPEG with libjpeg's accurate integer DCT and fancy upsampling,
    TensorFlow's INTEGER_ACCURATE). ValueError if the size is not the manifest's."""
    if image_format == "raw":
        pixels = np.frombuffer(encoded, dtype=np.uint8)
        if pixels.size != height * width * 3:
            raise ValueError(f"raw image of {pixels.size} bytes, expected {height}x{width}x3")
        return pixels.reshape(height, width, 3)
    with Image.open(io.BytesIO(encoded)) as image:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.shape != (height, width, 3):
        raise ValueError(f"stored image is {pixels.shape}, expected {(height, width, 3)}")
    return pixels


def example_from_record(record: bytes, image_format: str, height: int, width: int) -> Example:
    """A serialized record of the contract -> {"image": uint8 [H, W, 3], "label": int
    (the first label id, -1 if none: what the trainer trains on), "labels": tuple of
    label ids, "sha256": str (of the source file), "source_ids": tuple of str uris}."""
    features = records.parse_example(record)
    labels = tuple(int(label) for label in features.get(records.LABEL, ()))
    (encoded,) = features[records.ENCODED]
    (sha256,) = features[records.SHA256]
    return {
        "image": decode_image(encoded, image_format, height, width),
        "label": labels[0] if labels else -1,
        "labels": labels,
        "sha256": sha256.decode(),
        "source_ids": tuple(uri.decode() for uri in features.get(records.SOURCE_ID, ())),
    }


class ImageShards:
    """One split of a preprocess output (local folder or `gs://`), as a sequence.

    `len(ds)` records; `ds[i]` is `example_from_record` of record i, the split's shards
    taken in manifest order; `ds.record(i)` the serialized bytes; `ds.epoch(...)` an
    epoch in the trainer's order. Attributes: `labels` (names, index = label id),
    `height`, `width`, `image_format`, `num_examples` per shard.
    """

    def __init__(self, uri: str, split: str = "train"):
        manifest = read_manifest(uri)
        if split not in manifest.splits:
            raise KeyError(f"{uri} has no split {split!r} (it has "
                           f"{', '.join(manifest.splits)})")
        self.uri = uri
        self.split = split
        self.labels = tuple(manifest.labels)
        self.height, self.width = manifest.image.height, manifest.image.width
        self.image_format = manifest.image.format
        shards = [s for s in manifest.splits[split].shards if s.num_examples > 0]
        self.shard_paths = tuple(shard.path for shard in shards)
        self.num_examples = tuple(shard.num_examples for shard in shards)
        self._starts = [0, *np.cumsum(self.num_examples, dtype=np.int64).tolist()]
        self._io = _RangeReader()
        self._indexes: dict[int, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> Example:
        return example_from_record(self.record(index), self.image_format, self.height,
                                   self.width)

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:  # Grain uses it to name the source in checkpoints
        return f"ImageShards({self.uri!r}, {self.split!r})"

    def record(self, index: int) -> bytes:
        """The serialized tf.train.Example of record `index` (negative counts from the end)."""
        total = len(self)
        if not -total <= index < total:
            raise IndexError(f"record {index} of a split of {total}")
        index %= total
        shard = bisect.bisect_right(self._starts, index) - 1
        offset, length = self._shard_index(shard)[index - self._starts[shard]]
        framed = self._io.read(join(self.uri, self.shard_paths[shard]), offset, length)
        return record_index.unframe(framed)

    def epoch(self, epoch: int = 0, *, seed: int = 0, worker_index: int = 0,
              num_workers: int = 1) -> Iterator[Example]:
        """The examples worker `worker_index` of `num_workers` reads in `epoch`: each of
        its records once, in the trainer's uniform-over-examples order (`order`)."""
        for index in self.epoch_indices(epoch, seed=seed, worker_index=worker_index,
                                        num_workers=num_workers):
            yield self[int(index)]

    def epoch_indices(self, epoch: int = 0, *, seed: int = 0, worker_index: int = 0,
                      num_workers: int = 1) -> np.ndarray:
        """The record indices `epoch` yields, int64 [records of this worker]."""
        return order.epoch_order(self.num_examples, seed=seed, epoch=epoch,
                                 worker_index=worker_index, num_workers=num_workers)

    def _shard_index(self, shard: int) -> list[tuple[int, int]]:
        entries = self._indexes.get(shard)
        if entries is None:
            path = join(self.uri, record_index.index_path(self.shard_paths[shard]))
            entries = record_index.parse_index(self._io.read_all(path).decode())
            if len(entries) != self.num_examples[shard]:
                raise ValueError(f"{path} lists {len(entries)} records, the manifest "
                                 f"{self.num_examples[shard]}")
            with self._lock:
                self._indexes[shard] = entries
        return entries

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"], state["_io"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._io = _RangeReader()


class _RangeReader:
    """Byte ranges of files: `read(path, offset, length)`, `read_all(path)`. Open files
    and the storage client belong to the process that made them (a forked worker makes
    its own)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._files: dict[str, int] = {}
        self._bucket_client = None
        self._lock = threading.Lock()

    def read(self, path: str, offset: int, length: int) -> bytes:
        self._check_process()
        if "://" not in path:
            data = os.pread(self._descriptor(path), length, offset)
        elif path.startswith("gs://"):
            bucket, name = path[len("gs://"):].split("/", 1)
            blob = self._client().bucket(bucket).blob(name)
            data = blob.download_as_bytes(start=offset, end=offset + length - 1,
                                          checksum=None)  # the TFRecord CRCs check it
        else:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                handle.seek(offset)
                data = handle.read(length)
        if len(data) != length:
            raise ValueError(f"{path}: read {len(data)} bytes at {offset}, expected {length}")
        return data

    def read_all(self, path: str) -> bytes:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            return handle.read()

    def _check_process(self) -> None:
        # Forked: the storage client's connections and a lock held at the fork are the
        # parent's. Inherited descriptors stay usable (pread has no shared position).
        if os.getpid() != self._pid:
            self._pid, self._bucket_client, self._lock = os.getpid(), None, threading.Lock()

    def _descriptor(self, path: str) -> int:
        descriptor = self._files.get(path)
        if descriptor is None:
            with self._lock:
                descriptor = self._files.get(path)
                if descriptor is None:
                    descriptor = self._files[path] = os.open(path, os.O_RDONLY)
        return descriptor

    def _client(self):
        if self._bucket_client is None:
            from google.cloud import storage  # only for gs://: it is a slow import

            with self._lock:
                if self._bucket_client is None:
                    self._bucket_client = storage.Client()
        return self._bucket_client

    def __del__(self, _close=os.close) -> None:  # bound early: at exit `os` may be gone
        for descriptor in getattr(self, "_files", {}).values():
            _close(descriptor)

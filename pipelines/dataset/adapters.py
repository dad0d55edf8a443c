"""Thin adapters of `ImageShards` for PyTorch and Grain.

Both are map-style: `__len__` and `__getitem__(i)`, one decoded example per call, so
the frameworks' own samplers, shuffling, worker processes and batching apply. Their
default `transform` (`batchable`) makes every field fixed-size, which batching needs:
the labels become a multi-hot float32 vector, the source uris (a list of any length)
are left out (`ImageShards` has them).

PyTorch is not a dependency (its wheels are gigabytes): `TorchDataset`
(`torch_adapter.py`, imported only when asked for) subclasses `torch.utils.data.Dataset`
when torch is installed, and is a plain class with the same contract when it is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, SupportsIndex

import numpy as np

from pipelines.dataset.reader import Example, ImageShards


def batchable(example: Example, num_classes: int) -> dict[str, Any]:
    """{"image": uint8 [H, W, 3], "label": int64 (first label id, -1 if none),
    "labels": float32 [num_classes] multi-hot, "sha256": str}."""
    multi_hot = np.zeros(num_classes, dtype=np.float32)
    multi_hot[list(example["labels"])] = 1.0
    return {"image": example["image"], "label": np.int64(example["label"]),
            "labels": multi_hot, "sha256": example["sha256"]}


class MapStyle:
    """`shards` as a map-style source: len, and `transform(shards[i])` (default
    `batchable`)."""

    def __init__(self, shards: ImageShards,
                 transform: Callable[[Example], Any] | None = None):
        self.shards = shards
        self.transform = transform

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: SupportsIndex) -> Any:
        example = self.shards[int(index)]
        if self.transform is None:
            return batchable(example, len(self.shards.labels))
        return self.transform(example)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shards!r})"


class GrainSource(MapStyle):
    """A `grain.RandomAccessDataSource` over `shards` (`grain.MapDataset.source(...)`,
    or `grain.DataLoader(data_source=...)`)."""

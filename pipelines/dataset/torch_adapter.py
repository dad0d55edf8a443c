"""`TorchDataset`: `ImageShards` as a map-style PyTorch Dataset (see `adapters`).

A module of its own, imported only when `pipelines.dataset.TorchDataset` is first used,
so that importing the package never loads torch either.
"""

from __future__ import annotations

from pipelines.dataset.adapters import MapStyle


def _torch_dataset_class() -> type:
    try:
        from torch.utils.data import Dataset
    except ImportError:
        return object
    return Dataset


class TorchDataset(MapStyle, _torch_dataset_class()):
    """A map-style `torch.utils.data.Dataset` over `shards`: `DataLoader(TorchDataset(
    ImageShards(uri, "train")), batch_size=..., shuffle=True, num_workers=...)` gives
    batches of `batchable` examples (images as uint8 [B, H, W, 3] tensors)."""

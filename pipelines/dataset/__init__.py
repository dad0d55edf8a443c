"""Read a preprocess output without TensorFlow: `ImageShards(uri, split)`.

    from pipelines.dataset import ImageShards
    ds = ImageShards("gs://bucket/prep", "train")    # or a local folder
    len(ds); ds[i]  # {"image": uint8 [H, W, 3], "label", "labels", "sha256", "source_ids"}
    for example in ds.epoch(3, seed=0, worker_index=0, num_workers=8): ...

Random access through each shard's record index (`index/shards/*.idx`) and ranged
reads; Pillow and NumPy decode. `TorchDataset` and `GrainSource` adapt it to PyTorch
and Grain. Importing this package never imports TensorFlow (a test blocks the import).
"""

from pipelines.dataset.adapters import GrainSource, batchable
from pipelines.dataset.order import epoch_order
from pipelines.dataset.reader import ImageShards, decode_image, example_from_record


def __getattr__(name: str):
    if name == "TorchDataset":  # loads torch when it is installed: only when asked for
        from pipelines.dataset.torch_adapter import TorchDataset

        return TorchDataset
    raise AttributeError(name)


__all__ = ["GrainSource", "ImageShards", "TorchDataset", "batchable", "decode_image",
           "epoch_order", "example_from_record"]

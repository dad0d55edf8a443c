"""pipelines.dataset: the TensorFlow-free reader, held to what the trainer reads.

One real preprocess output (the corpus: every encoding, a multi-label image) made once
for the module; the gs:// tests read the same folder uploaded to fake-gcs-server.
"""

import pickle
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipelines.contract import record_index
from pipelines.contract.manifest import read_manifest
from pipelines.dataset import GrainSource, ImageShards, TorchDataset, epoch_order
from pipelines.dataset.order import uniform_schedule
from tests.support.corpus_output import preprocess_corpus
from tests.support.gcs_emulator import GcsEmulator


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return preprocess_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def in_bucket(prep):
    with GcsEmulator() as emulator:
        emulator.create_bucket("prep")
        emulator.upload_folder(prep, "gs://prep/out")
        yield "gs://prep/out"


def trainer_view(root: str, split: str) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The split's records as tf.data reads them, and the trainer's pixels and labels."""
    import tensorflow as tf

    from trainer import input as input_lib

    spec = input_lib.DataSpec.from_manifest(root, read_manifest(root))
    paths = [shard.path for shard in spec.splits[split]]
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(paths)]
    images, labels = input_lib.parse_batch(tf.constant(serialized), spec)
    return serialized, images.numpy(), labels.numpy()


def assert_same_as_trainer(ds: ImageShards, root: str, split: str) -> None:
    serialized, images, labels = trainer_view(root, split)
    assert [ds.record(i) for i in range(len(ds))] == serialized
    pixels = np.stack([ds[i]["image"] for i in range(len(ds))])
    assert pixels.dtype == np.uint8 and pixels.shape == images.shape
    # Pillow's libjpeg and TensorFlow's (INTEGER_ACCURATE) decode bit-identically.
    assert np.abs(pixels.astype(int) - images.astype(int)).max() == 0
    assert [ds[i]["label"] for i in range(len(ds))] == labels.tolist()


@pytest.mark.parametrize("split", ["train", "validation"])
def test_records_pixels_and_labels_equal_the_trainers(prep, split):
    ds = ImageShards(prep, split)
    assert len(ds) == read_manifest(prep).splits[split].num_examples > 0
    assert_same_as_trainer(ds, prep, split)


def test_examples_carry_every_field(prep):
    ds = ImageShards(prep, "train")
    manifest = read_manifest(prep)
    examples = list(ds)
    assert {e["sha256"] for e in examples} | {e["sha256"] for e in ImageShards(prep, "validation")
                                              } == _index_sha256s(prep)
    multi = [e for e in examples + list(ImageShards(prep, "validation")) if len(e["labels"]) > 1]
    assert len(multi) == 1 and multi[0]["label"] == multi[0]["labels"][0]
    assert sorted(ds.labels[i] for e in examples for i in e["labels"]) == sorted(
        label for label, n in manifest.splits["train"].class_counts.items() for _ in range(n))
    assert all(e["source_ids"] and all(uri.startswith("/") for uri in e["source_ids"])
               for e in examples)


def _index_sha256s(root: str) -> set[str]:
    import json

    with open(f"{root}/index/images.jsonl") as handle:
        return {json.loads(line)["sha256"] for line in handle}


def test_random_access_equals_sequential_reading(prep):
    ds = ImageShards(prep, "train")
    in_order = [ds[i] for i in range(len(ds))]
    fresh = ImageShards(prep, "train")  # no record index loaded yet
    for i in np.random.default_rng(0).permutation(len(ds)):
        assert fresh[int(i)]["sha256"] == in_order[i]["sha256"]
        np.testing.assert_array_equal(fresh[int(i)]["image"], in_order[i]["image"])
    assert ds[-1]["sha256"] == in_order[-1]["sha256"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_each_shard_has_a_record_index_spanning_it(prep):
    for split in ("train", "validation"):
        for shard in read_manifest(prep).splits[split].shards:
            with open(f"{prep}/{record_index.index_path(shard.path)}") as handle:
                entries = record_index.parse_index(handle.read())
            with open(f"{prep}/{shard.path}", "rb") as handle:
                data = handle.read()
            assert len(entries) == shard.num_examples
            assert sum(length for _, length in entries) == len(data) == shard.num_bytes
            for offset, length in entries:  # what tfrecord2idx computes: data + 16
                assert struct.unpack("<Q", data[offset:offset + 8])[0] + 16 == length


def test_a_stale_index_is_an_error_not_a_wrong_image(prep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prep, copy)
    shard = read_manifest(prep).splits["train"].shards[0]
    index = copy / record_index.index_path(shard.path)
    entries = record_index.parse_index(index.read_text())
    (a_offset, a_length), (b_offset, b_length) = entries[:2]
    # The first two records swapped in the data file, the index as it was.
    with open(copy / shard.path, "r+b") as handle:
        data = handle.read()
        handle.seek(0)
        handle.write(data[b_offset:b_offset + b_length] + data[a_offset:a_offset + a_length])
    if a_length != b_length:
        with pytest.raises(ValueError, match="TFRecord"):
            ImageShards(str(copy), "train")[0]
    bad = bytearray(data[a_offset:a_offset + a_length])
    bad[-10] ^= 1
    with pytest.raises(ValueError, match="data CRC"):
        record_index.unframe(bytes(bad))


def test_gs_reads_the_same_records_and_pixels(prep, in_bucket):
    ds = ImageShards(in_bucket, "train")
    local = ImageShards(prep, "train")
    assert len(ds) == len(local)
    for i in np.random.default_rng(1).permutation(len(ds)):  # random access: ranged reads
        assert ds.record(int(i)) == local.record(int(i))
    assert_same_as_trainer(ds, prep, "train")


def test_importing_and_reading_never_imports_tensorflow(prep, in_bucket):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "keras",
                                          "torch"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from pipelines.dataset import GrainSource, ImageShards
        for uri in ({prep!r}, {in_bucket!r}):
            ds = ImageShards(uri, "train")
            assert ds[len(ds) - 1]["image"].shape == (32, 48, 3)
            assert len(list(ds.epoch(0, seed=1))) == len(ds)
        untouched = sorted(m for m in sys.modules if m.startswith(("tensor", "torch")))
        from pipelines.dataset import TorchDataset  # torch blocked: the plain-class fallback
        assert len(TorchDataset(ds)) == len(GrainSource(ds)) == len(ds)
        print("ok", untouched)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "[]"]


def test_epoch_order_is_uniform_over_examples():
    counts = [1000, 2000, 3000]
    shards = uniform_schedule(counts, np.random.default_rng(0))[:, 0]
    assert np.bincount(shards).tolist() == counts
    # Any prefix holds the shards 1:2:3 (a plain round-robin interleave gives 1:1:1).
    for prefix in (600, 3000):
        share = np.bincount(shards[:prefix], minlength=3) / prefix
        np.testing.assert_allclose(share, [1 / 6, 2 / 6, 3 / 6], atol=0.05)
    # Each shard is read front to back.
    order = uniform_schedule(counts, np.random.default_rng(0))
    for shard in range(3):
        assert order[order[:, 0] == shard, 1].tolist() == list(range(counts[shard]))


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
def test_epochs_give_every_record_once_split_between_workers(num_workers):
    counts = [7, 3, 9, 4]  # 5 workers: fewer shards than workers, split by record
    orders = [epoch_order(counts, seed=4, epoch=2, worker_index=w, num_workers=num_workers)
              for w in range(num_workers)]
    together = np.concatenate(orders)
    assert sorted(together.tolist()) == list(range(sum(counts)))
    assert all(len(o) for o in orders)
    same = epoch_order(counts, seed=4, epoch=2, worker_index=0, num_workers=num_workers)
    np.testing.assert_array_equal(same, orders[0])
    other = epoch_order(counts, seed=4, epoch=3, worker_index=0, num_workers=num_workers)
    assert other.tolist() != orders[0].tolist()
    with pytest.raises(ValueError):
        epoch_order(counts, seed=4, epoch=2, worker_index=num_workers, num_workers=num_workers)


def test_epoch_yields_the_examples_in_that_order(prep):
    ds = ImageShards(prep, "train")
    order = ds.epoch_indices(1, seed=7, worker_index=1, num_workers=2)
    assert [e["sha256"] for e in ds.epoch(1, seed=7, worker_index=1, num_workers=2)] == [
        ds[int(i)]["sha256"] for i in order]


def test_torch_contract_without_torch(prep):
    # torch's CUDA wheels are gigabytes: not installed on CI. The adapter keeps the
    # map-style contract DataLoader relies on: len, getitem, fixed-size fields, pickling
    # (worker processes), so default_collate can stack a batch.
    ds = TorchDataset(ImageShards(prep, "train"))
    restored = pickle.loads(pickle.dumps(ds))
    batch = [restored[i] for i in range(4)]
    assert len(restored) == len(ds.shards)
    assert np.stack([b["image"] for b in batch]).shape == (4, 32, 48, 3)
    labels = np.stack([b["labels"] for b in batch])
    assert labels.dtype == np.float32 and labels.shape == (4, 2)
    assert [int(np.argmax(row)) for row in labels] == [b["label"] for b in batch]
    custom = TorchDataset(ds.shards, transform=lambda e: e["image"].mean())
    assert isinstance(custom[0], float | np.floating)


def test_grain_reads_it_with_its_own_loader(prep):
    import grain.python as grain

    source = GrainSource(ImageShards(prep, "train"))
    assert isinstance(source, grain.RandomAccessDataSource)
    loader = grain.DataLoader(
        data_source=source,
        sampler=grain.IndexSampler(len(source), grain.NoSharding(), shuffle=True,
                                   num_epochs=1, seed=0),
        operations=[grain.Batch(4, drop_remainder=False)],
        worker_count=0,  # in process: a worker process costs seconds (pickling: above)
    )
    batches = list(loader)
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (len(source), 32, 48, 3) and images.dtype == np.uint8
    assert sorted(sha for b in batches for sha in b["sha256"]) == sorted(
        e["sha256"] for e in source.shards)

"""The trainer's tf.data input: uniform sampling over unequal shards, parsing, shapes."""

import json
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from pipelines.contract import imaging_tf, records
from pipelines.contract.imaging import ResizeMode
from pipelines.contract.manifest import read_manifest
from trainer import config as config_lib
from trainer import distribute
from trainer import input as input_lib

SIZES = (1000, 2000, 3000)


@pytest.fixture(scope="module")
def unequal_shards(tmp_path_factory):
    """Three shards of 1000, 2000 and 3000 records; record = b'<shard>:<index>'."""
    root = tmp_path_factory.mktemp("unequal")
    shards = []
    for shard, size in enumerate(SIZES):
        path = root / f"train-{shard}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for index in range(size):
                writer.write(f"{shard}:{index}".encode())
        shards.append(input_lib.Shard(str(path), size, path.stat().st_size))
    return tuple(shards)


def shard_ids(dataset, limit=None):
    items = [r.decode() for r in dataset.take(limit or -1).as_numpy_iterator()]
    return [int(item.split(":")[0]) for item in items], items


def test_sampling_is_uniform_over_examples_on_unequal_shards(unequal_shards):
    half = sum(SIZES) // 2
    for epoch in range(3):
        ids, _ = shard_ids(input_lib.epoch_records(unequal_shards, tf.constant([7, epoch],
                                                                              tf.int64)), half)
        counts = Counter(ids)
        # 1:2:3 -> 500/1000/1500 expected; sd of a hypergeometric count here is < 20.
        for shard, size in enumerate(SIZES):
            assert abs(counts[shard] - size / 2) < 80, (epoch, counts)
        # Every quarter of the first half keeps the proportions, not just the total.
        quarter = Counter(ids[: half // 2])
        assert quarter[0] < quarter[1] < quarter[2], quarter


def test_naive_interleave_is_not_uniform(unequal_shards):
    """The failure the schedule avoids: files drawn in turn, 1:1:1 while all last."""
    naive = tf.data.Dataset.from_tensor_slices([s.path for s in unequal_shards]).interleave(
        tf.data.TFRecordDataset, cycle_length=3, block_length=1)
    counts = Counter(shard_ids(naive, sum(SIZES) // 2)[0])
    assert all(abs(counts[shard] - 1000) <= 1 for shard in range(3)), counts


def test_an_epoch_holds_every_record_once_and_epochs_differ(unequal_shards):
    epochs = [shard_ids(input_lib.epoch_records(unequal_shards, tf.constant([0, e], tf.int64)))[1]
              for e in (0, 1)]
    again = shard_ids(input_lib.epoch_records(unequal_shards, tf.constant([0, 0], tf.int64)))[1]
    assert len(epochs[0]) == len(set(epochs[0])) == sum(SIZES)
    assert set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]
    assert again == epochs[0], "an epoch's order is a function of (seed, epoch): resumable"
    # Within a shard, records come front to back (the pipeline already shuffled them).
    first = [int(item.split(":")[1]) for item in epochs[0] if item.startswith("0:")]
    assert first == sorted(first)


def test_uniform_schedule_draws_every_record_and_few_phantoms():
    counts = [300, 0, 500, 100]
    ids = Counter(input_lib.uniform_schedule(counts, tf.constant([1, 2], tf.int64))
                  .as_numpy_iterator())
    assert set(ids) == {0, 2, 3} and all(ids[i] >= n for i, n in enumerate(counts))
    assert sum(ids.values()) - sum(counts) < input_lib.SCHEDULE_BLOCK


def test_parsed_batches_are_the_stored_pixels_and_first_labels(photo_prep):
    manifest = read_manifest(str(photo_prep.output))
    spec = input_lib.DataSpec.from_manifest(str(photo_prep.output), manifest)
    assert spec.labels == manifest.labels and spec.transform_output
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(spec.splits["test"][0].path)]
    images, labels = input_lib.parse_batch(tf.constant(serialized), spec)
    assert images.shape == (len(serialized), 64, 64, 3) and images.dtype == tf.uint8
    for index, raw in enumerate(serialized):
        example = tf.train.Example.FromString(raw).features.feature
        assert labels[index] == example[records.LABEL].int64_list.value[0]
        stored = example[records.ENCODED].bytes_list.value[0]
        # The serving graph, given the stored JPEG, computes exactly the training pixels.
        served = imaging_tf.process_image(tf.constant(stored), (64, 64), ResizeMode.SQUASH)
        np.testing.assert_array_equal(images[index].numpy(), served.numpy())


def test_a_record_with_several_labels_trains_on_the_first():
    spec = input_lib.DataSpec("", 2, 2, "raw", "squash", 10**8, ("a", "b", "c"), {}, None)
    record = records.make_example(
        encoded=bytes(range(12)), image_format="raw", height=2, width=2, label_ids=[2, 0],
        labels=["c", "a"], source_uris=["x"], sha256="0", original_height=2, original_width=2)
    images, labels = input_lib.parse_batch(tf.constant([record, record]), spec)
    assert labels.numpy().tolist() == [2, 2]
    assert images[0, 1, 1].numpy().tolist() == [9, 10, 11]


def test_train_batches_cover_an_epoch_uniformly(photo_prep):
    manifest = read_manifest(str(photo_prep.output))
    spec = input_lib.DataSpec.from_manifest(str(photo_prep.output), manifest)
    examples = spec.num_examples("train")
    steps = input_lib.steps_per_epoch(examples, 8)
    dataset = input_lib.train_dataset(spec, 8, shuffle_buffer_bytes=50_000)
    labels = []
    for images, batch_labels in dataset.take(steps * 3):
        assert images.shape == (8, 64, 64, 3) and images.dtype == tf.uint8
        labels.extend(batch_labels.numpy().tolist())
    counts = Counter(labels)
    train_counts = manifest.splits["train"].class_counts
    expected = {spec.labels.index(k): 3 * v for k, v in train_counts.items()}
    # Three epochs' worth of batches (the stream runs on across epoch ends).
    assert all(abs(counts[k] - v) <= 8 + v * 0.1 for k, v in expected.items()), (counts, expected)


def test_worker_shards_split_files_or_fall_back_to_data():
    shards = tuple(input_lib.Shard(f"s{i}", 10, 100) for i in range(5))
    mine, by_data = input_lib.worker_shards(shards, 1, 2)
    assert [s.path for s in mine] == ["s1", "s3"] and not by_data
    assert input_lib.worker_shards(shards[:1], 1, 2) == (shards[:1], True)


def test_cluster_position_from_tf_config():
    cluster = {"chief": ["c:1"], "worker": ["w:1", "w:2"]}
    tf_config = {"cluster": cluster, "task": {"type": "worker", "index": 1}}
    assert distribute.cluster_position({"TF_CONFIG": json.dumps(tf_config)}) == (2, 3)
    assert distribute.cluster_position({}) == (0, 1)


def test_flags_and_vertex_variables():
    environ = {"AIP_MODEL_DIR": "gs://b/model/", "AIP_CHECKPOINT_DIR": "gs://b/ckpt",
               "AIP_TENSORBOARD_LOG_DIR": "gs://b/tb"}
    config = config_lib.parse_args(["--data", "gs://b/prep/", "--shuffle_buffer", "32MiB"],
                                   environ)
    assert config.model_dir == "gs://b/model" and config.saved_model_dir == "gs://b/model/"
    assert (config.checkpoint_dir, config.tensorboard_dir) == ("gs://b/ckpt", "gs://b/tb")
    assert config.shuffle_buffer_bytes == 32 * 2**20 and config.data == "gs://b/prep"
    local = config_lib.parse_args(["--data", "d", "--model_dir", "m"], {})
    assert local.saved_model_dir == "m/saved_model" and local.checkpoint_dir == "m/checkpoints"
    with pytest.raises(config_lib.UsageError):
        config_lib.parse_args(["--data", "d"], {})
    assert local.steps_per_execution == 16
    assert config_lib.parse_args(["--data", "d", "--model_dir", "m", "--steps_per_execution",
                                  "1"], {}).steps_per_execution == 1
    with pytest.raises(config_lib.UsageError, match="steps_per_execution"):
        config_lib.parse_args(["--data", "d", "--model_dir", "m", "--steps_per_execution",
                               "0"], {})

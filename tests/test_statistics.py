"""The statistics proto: parsed back the way TFDV loads it and checked against the shards."""

import io
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipelines.contract import records
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing.transforms import ImageMeta
from pipelines.stats import feature_stats as stats_lib
from tests import stats_outputs


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return stats_outputs.base_output(tmp_path_factory)


def load_stats_binary(path: Path) -> statistics_pb2.DatasetFeatureStatisticsList:
    """What tfdv.load_stats_binary does: parse a serialized DatasetFeatureStatisticsList."""
    stats = statistics_pb2.DatasetFeatureStatisticsList()
    stats.ParseFromString(path.read_bytes())
    return stats


def shard_rows(out: Path, manifest: dict, split: str) -> list[dict]:
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        for raw in tf.data.TFRecordDataset(str(out / shard["path"])):
            example = tf.io.parse_single_example(raw, records.FEATURE_SPEC)
            rows.append({
                "labels": [v.decode() for v in example[records.LABEL_TEXT].values.numpy()],
                "height": int(example[records.HEIGHT]),
                "width": int(example[records.WIDTH]),
                "original_height": int(example[records.ORIGINAL_HEIGHT]),
                "original_width": int(example[records.ORIGINAL_WIDTH]),
                "num_bytes": len(example[records.ENCODED].numpy()),
                "format": example[records.FORMAT].numpy().decode(),
                "source": example[records.SOURCE_ID].values.numpy()[0].decode(),
            })
    return rows


def numeric(dataset, path):
    return stats_lib.find_feature(dataset, path).num_stats


def test_one_dataset_per_split_plus_dead_letters(output):
    manifest = read_manifest(str(output)).to_json()
    assert manifest["statistics"] == stats_lib.STATISTICS_PATH
    stats = load_stats_binary(output / manifest["statistics"])
    assert [d.name for d in stats.datasets] == [*manifest["splits"], stats_lib.DEAD_LETTERS]


def test_split_statistics_match_the_shards(output):
    manifest = read_manifest(str(output)).to_json()
    stats = load_stats_binary(output / manifest["statistics"])
    datasets = stats_lib.split_datasets(stats)
    for split in manifest["splits"]:
        rows = shard_rows(output, manifest, split)
        dataset = datasets[split]
        assert dataset.num_examples == len(rows)
        if not rows:
            continue
        labels = Counter(label for row in rows for label in row["labels"])
        assert stats_lib.value_counts(dataset, stats_lib.LABELS) == labels
        label_feature = stats_lib.find_feature(dataset, stats_lib.LABELS)
        assert label_feature.string_stats.unique == len(labels)
        assert label_feature.string_stats.common_stats.tot_num_values == sum(labels.values())
        assert stats_lib.value_counts(dataset, stats_lib.STORED_FORMAT) == {"png": len(rows)}
        for path, key in ((stats_lib.HEIGHT, "height"), (stats_lib.WIDTH, "width"),
                          (stats_lib.ORIGINAL_HEIGHT, "original_height"),
                          (stats_lib.ORIGINAL_WIDTH, "original_width"),
                          (stats_lib.STORED_BYTES, "num_bytes")):
            values = sorted(row[key] for row in rows)
            got = numeric(dataset, path)
            assert got.common_stats.num_non_missing == len(rows)
            assert (got.min, got.max) == (values[0], values[-1])
            assert got.mean == pytest.approx(sum(values) / len(values))
            mean = sum(values) / len(values)
            assert got.std_dev == pytest.approx(
                math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), abs=1e-6)
            # exact below 2048, else kept at 11 significant bits (statistics.py)
            assert got.median == pytest.approx(values[math.ceil(len(values) / 2) - 1],
                                               rel=5e-4)
            buckets = stats_lib.standard_histogram(dataset, path)
            assert sum(count for _, _, count in buckets) == len(rows)
            for value in values:  # every value sits in a bucket that holds it
                assert any(low <= value < high and count for low, high, count in buckets)
        encoded = stats_lib.find_feature(dataset, stats_lib.ENCODED).bytes_stats
        sizes = [row["num_bytes"] for row in rows]
        assert encoded.min_num_bytes == min(sizes) and encoded.max_num_bytes_int == max(sizes)
        assert encoded.avg_num_bytes == pytest.approx(sum(sizes) / len(sizes))
        formats = Counter(Image.open(io.BytesIO(Path(row["source"]).read_bytes())).format
                          for row in rows)
        assert stats_lib.value_counts(dataset, stats_lib.SOURCE_FORMAT) == formats


def test_dead_letters_dataset_matches_the_error_file(output):
    manifest = read_manifest(str(output)).to_json()
    stats = load_stats_binary(output / manifest["statistics"])
    errors = [json.loads(line) for line in (output / manifest["errors_path"]).open()]
    dataset = stats_lib.dead_letters(stats)
    assert dataset.num_examples == len(errors) == manifest["accounting"]["errors"]
    assert stats_lib.value_counts(dataset, stats_lib.REASON) == Counter(e["reason"] for e in errors)
    assert stats_lib.error_rate(stats) == pytest.approx(
        len(errors) / manifest["accounting"]["files_seen"])


def fake_image(labels=("cat",), height=30, width=40, stored=100, source=1000, fmt="JPEG"):
    meta = ImageMeta(height, width, fmt, (10.0, 20.0, 30.0), (100.0, 400.0, 900.0),
                     stored_sha256="")
    return SimpleNamespace(labels=labels, stored_bytes=stored, source_bytes=source, meta=meta,
                           split="train")


def test_aggregates_merge_like_one_pass():
    images = [fake_image(height=h, stored=s) for h, s in ((10, 5000), (20, 70000), (30, 123))]
    whole, left, right = (stats_lib.SplitAggregate() for _ in range(3))
    for index, image in enumerate(images):
        whole.add_image(image, 8, 8, "jpeg")
        (left if index < 2 else right).add_image(image, 8, 8, "jpeg")
    left.merge(right)
    assert left == whole
    built = stats_lib.split_dataset("train", whole)
    assert numeric(built, stats_lib.ORIGINAL_HEIGHT).median == 20
    means, stds = whole.pixel_mean_std()
    assert means == pytest.approx([10 / 64, 20 / 64, 30 / 64])


def test_log_buckets_hold_their_edges():
    for value in (1, 2, 16, 181, 224, 4096, 10**6):
        low, high = stats_lib.bucket_edges(stats_lib.log_bucket(value))
        assert low <= value < high
    assert stats_lib.log_bucket(0) == -1000


def test_aggregate_splits_transform():
    images = [fake_image(("cat",)), fake_image(("cat", "dog")),
              SimpleNamespace(**{**vars(fake_image(("dog",))), "split": "test"})]
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(images)
            | stats_lib.AggregateSplits(8, 8, "jpeg")
            | beam.Map(lambda kv: (kv[0], kv[1].num_examples, dict(kv[1].labels)))
        )
        assert_that(out, equal_to([("train", 2, {"cat": 2, "dog": 1}),
                                   ("test", 1, {"dog": 1})]))


def test_empty_split_has_no_features():
    stats = stats_lib.build_statistics({}, ["train"], stats_lib.summarize_dead_letters([], 0))
    assert [(d.name, d.num_examples, len(d.features)) for d in stats.datasets][0] == (
        "train", 0, 0)
    assert stats_lib.error_rate(stats) == 0.0

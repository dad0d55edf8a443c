"""The typed manifest: read and written in one place, validated on read."""

import json

import pytest

from pipelines.contract import manifest as manifest_lib
from pipelines.contract.manifest import Manifest, ManifestError, read_manifest

# A manifest.json as preprocess writes it (keys in the file's order).
GOLDEN = {
    "format_version": 1,
    "input": "gs://bucket/raw",
    "config": {"image": {"height": 8, "width": 8}},
    "image": {"height": 8, "width": 8, "channels": 3, "format": "jpeg", "resize": "squash"},
    "labels": ["cat", "dog"],
    "splits": {
        "train": {"num_examples": 3, "class_counts": {"cat": 2, "dog": 1},
                  "shards": [{"path": "data/train-00000-of-00001.tfrecord",
                              "num_examples": 3, "num_bytes": 120}]},
        "test": {"num_examples": 0, "class_counts": {"cat": 0, "dog": 0}, "shards": []},
    },
    "accounting": {"files_seen": 5, "images_written": 3, "duplicates": 1,
                   "label_conflicts": 0, "errors": 1, "skipped": 0, "hidden_ignored": 2,
                   "reused": 0, "reuse_mismatches": 0},
    "skipped": [],
    "errors_path": "errors/errors.jsonl",
    "index_path": "index/images.jsonl",
    "entries": list(manifest_lib.OUTPUT_ENTRIES),
    "statistics": "stats/statistics.pb",
    "anomalies": "stats/anomalies.json",
    "report": "stats/report.html",
    "transform_output": "transform_output",
    "timings": {"started_at": "2026-12-01 10:00:00 UTC"},
}


def test_a_written_manifest_reads_back_to_the_same_json_in_the_same_key_order(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(GOLDEN, indent=2) + "\n")
    manifest = read_manifest(str(tmp_path))
    assert json.dumps(manifest.to_json(), indent=2) == json.dumps(GOLDEN, indent=2)
    assert manifest.labels == ("cat", "dog") and manifest.image.size == (8, 8)
    assert manifest.splits["train"].shards[0].num_bytes == 120
    assert manifest.shard_paths("train") == ["data/train-00000-of-00001.tfrecord"]
    assert manifest.shard_paths("validation") == []
    assert manifest.accounting.image_files == 5


def test_an_output_without_statistics_has_none_of_their_keys():
    plain = {k: v for k, v in GOLDEN.items()
             if k not in ("statistics", "anomalies", "report", "transform_output", "timings")}
    manifest = Manifest.from_json(plain)
    assert manifest.report is None and manifest.to_json() == plain


@pytest.mark.parametrize("change, message", [
    ({"image": {"height": 8}}, "malformed"),
    ({"splits": {"train": {"num_examples": 1}}}, "malformed"),
    ({"accounting": {"files_seen": "x"}}, "malformed"),
    ({"labels": None}, "malformed"),
    ({"format_version": 0}, "format_version 0"),
])
def test_a_manifest_of_the_wrong_shape_is_a_clear_error(change, message, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({**GOLDEN, **change}))
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(tmp_path))


def test_a_manifest_that_is_not_json_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not a manifest this version can read"):
        read_manifest(str(tmp_path))

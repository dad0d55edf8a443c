"""Flaky storage: a gs:// -> gs:// run through 10 % failing requests gives the same bytes.

Faults come from `tests/faults.py` (a seeded proxy in front of fake-gcs-server): 503 and
429 answers, connections reset before a request is applied, after it is applied (the
answer is lost), and mid-body, plus delays. Nothing in the pipeline knows about them:
recovery is the storage client's retry (google.api_core.retry.Retry with
google.cloud.storage's predicate) that Beam's GcsIO passes to every call; see README
"Flaky storage".
"""

from __future__ import annotations

import contextlib
import json

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp import gcsio_retry
from google.api_core import exceptions as google_errors
from google.cloud.storage import retry as storage_retry

from pipelines import preprocess
from pipelines.contract.imaging import ImageSpec
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing.sources import SourceFile
from pipelines.preprocessing.spill import SpillRef
from pipelines.preprocessing.transforms import (
    DecodeSourceFn,
    UniqueImage,
    WriteShardFn,
    decode_source,
)
from tests import corpus
from tests.faults import FAILURE_KINDS, FaultPlan, FlakyGcsEmulator

ARGS = ["--image_size", "32,48", "--num_shards", "2", "--no_progress",
        *corpus.ERROR_BUDGET_ARGS]


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    plan = FaultPlan(rate=0.10, seed=3)
    with FlakyGcsEmulator(plan) as emulator:
        raw = tmp_path_factory.mktemp("raw")
        expected = corpus.write_corpus(raw)
        emulator.create_bucket("images")
        emulator.upload_folder(str(raw), "gs://images/raw")
        yield emulator, plan, expected


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def test_ten_percent_failing_requests_give_byte_identical_output(flaky):
    emulator, plan, expected = flaky
    # Reference: fault-free, one process (parallelism does not change bytes: e2e tests).
    assert preprocess.run(["--input", "gs://images/raw", "--output", "gs://images/clean",
                           *ARGS, "--direct_running_mode", "in_memory"]) == 0
    with plan.active():  # worker processes, each with its own client and retries
        assert preprocess.run(["--input", "gs://images/raw", "--output", "gs://images/flaky",
                               *ARGS, "--direct_running_mode", "multi_processing"]) == 0

    share = plan.failures / plan.requests
    print(f"{plan.requests} requests, {plan.failures} failed ({share:.0%}): "
          f"{dict(plan.injected)}")
    assert 0.05 <= share <= 0.2, plan.injected
    assert all(plan.injected[kind] for kind in FAILURE_KINDS), plan.injected

    clean, flaky_manifest = read_manifest("gs://images/clean").to_json(), read_manifest("gs://images/flaky").to_json()
    assert {k: flaky_manifest["accounting"][k] for k in expected} == expected
    assert flaky_manifest["splits"] == clean["splits"]
    assert flaky_manifest["skipped"] == clean["skipped"]
    shards = [s["path"] for entry in clean["splits"].values() for s in entry["shards"]]
    for relative in [*shards, "errors/errors.jsonl", "index/images.jsonl"]:
        assert _read(f"gs://images/flaky/{relative}") == _read(f"gs://images/clean/{relative}"), \
            relative
    errors = [json.loads(line) for line in _read("gs://images/flaky/errors/errors.jsonl")
              .decode().splitlines()]
    assert all(e["stage"] == "decode" for e in errors)  # no read error leaked through
    assert FileSystems.match(["gs://images/flaky/_tmp/**"])[0].metadata_list == []
    assert not FileSystems.exists("gs://images/flaky/_IN_PROGRESS")


def test_a_file_deleted_after_listing_is_a_dead_letter_not_a_failed_job(flaky, tmp_path):
    """404 on read (the object went away since the listing) used to escape the DoFn as
    google.api_core NotFound and fail the whole job; locally it was already a dead letter."""
    fn = DecodeSourceFn(ImageSpec(32, 48), str(tmp_path), None)
    fn.setup()
    fn.start_bundle()
    (out,) = fn.process(SourceFile("gs://images/raw/cat/gone.jpg", ("cat",)))
    assert out.value.reason == "unreadable" and "404" in out.value.detail


def test_fault_plan_is_deterministic_and_bounded():
    decisions = []
    for _ in range(2):
        plan = FaultPlan(rate=0.5, seed=9, max_consecutive=2)
        with plan.active():
            decisions.append([plan.decide("GET", f"/o/{i % 5}?upload_id=abc{i}")[0]
                              for i in range(200)])
    assert decisions[0] == decisions[1]
    streak = longest = 0
    for kind in [d for i, d in enumerate(decisions[0]) if i % 5 == 0]:  # one key's attempts
        streak = streak + 1 if kind else 0
        longest = max(longest, streak)
    assert 0 < longest <= 2


def _decode_one(uri: str, spill_dir) -> list:
    fn = DecodeSourceFn(ImageSpec(32, 48), str(spill_dir), None)
    fn.setup()
    fn.start_bundle()
    return list(fn.process(SourceFile(uri, ("cat",))))


@contextlib.contextmanager
def _always(plan: FaultPlan, kind: str):
    plan.always = {"raw/cat/photo1.jpg": kind}
    try:
        yield "gs://images/raw/cat/photo1.jpg"
    finally:
        plan.always = {}


def test_a_forbidden_object_is_a_dead_letter(flaky, tmp_path):
    _, plan, _ = flaky
    with _always(plan, "403") as uri:
        (out,) = _decode_one(uri, tmp_path)
    assert out.value.reason == "unreadable" and "403" in out.value.detail


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_a_read_that_keeps_failing_fails_the_bundle_instead_of_dropping_the_image(
        flaky, tmp_path, monkeypatch, kind):
    """Past the storage client's retries (cut to ~2 s here; 120 s by default) a 503 or a
    reset connection raises (RetryError), so the runner retries the bundle. A guard: the
    narrowed dead-letter rule (test_transforms) must keep letting these through."""
    _, plan, _ = flaky
    for retry in (storage_retry.DEFAULT_RETRY, gcsio_retry.DEFAULT_RETRY_WITH_THROTTLING_COUNTER):
        monkeypatch.setattr(retry, "_timeout", 2.0)
    with _always(plan, kind) as uri, pytest.raises(google_errors.RetryError):
        _decode_one(uri, tmp_path)
    assert plan.injected[f"always_{kind}"] >= 2  # the client did retry first


@pytest.mark.parametrize("earlier", ["truncated", "deleted"])
def test_reused_bytes_from_a_damaged_gs_shard_are_decoded_again(flaky, tmp_path, earlier):
    """GCS answers a read past a truncated object's end with fewer bytes, and a deleted
    shard with 404: either way the image is made from its source again, and counted."""
    spec = ImageSpec(32, 48)
    uri = "gs://images/raw/cat/photo1.jpg"
    fresh = decode_source(SourceFile(uri, ("cat",)), spec)
    shard = f"gs://images/earlier-{earlier}/data/train-00000-of-00001.tfrecord"
    if earlier == "truncated":
        with FileSystems.create(shard) as handle:
            handle.write(b"header" + fresh.image.encoded[:-1])
    image = UniqueImage(
        fresh.sha256, (uri,), ("cat",), False,
        SpillRef(shard, len(b"header"), len(fresh.image.encoded)), fresh.source_bytes,
        fresh.meta, "train", "0", reused=True)
    fn = WriteShardFn(str(tmp_path / "out"), spec, ["cat"])
    fn.setup()
    (info,) = fn.process((("train", 0, 1), [image]))
    assert (info.num_reused, info.num_reuse_mismatch) == (0, 1)
    (row,) = [json.loads(line) for line in info.index_lines.splitlines()]
    written = (tmp_path / "out" / info.path).read_bytes()
    assert written[row["offset"]:row["offset"] + row["length"]] == fresh.image.encoded

"""The same end-to-end run with gs:// input and output, against fake-gcs-server."""

import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import preprocess
from pipelines.contract import records
from pipelines.contract.manifest import read_manifest
from tests import corpus
from tests.support.gcs_emulator import GcsEmulator


@pytest.fixture(scope="module")
def emulator():
    with GcsEmulator() as running:
        yield running


def test_gs_to_gs_run_matches_local_run(emulator, tmp_path):
    raw = tmp_path / "raw"
    expected = corpus.write_corpus(raw)
    emulator.create_bucket("images")
    emulator.upload_folder(str(raw), "gs://images/raw")
    args = ["--image_size", "32,48", "--num_shards", "2", "--no_progress",
            *corpus.ERROR_BUDGET_ARGS]
    assert preprocess.run(["--input", "gs://images/raw", "--output", "gs://images/prep",
                           *args]) == 0
    manifest = read_manifest("gs://images/prep").to_json()
    assert {k: manifest["accounting"][k] for k in expected} == expected
    assert FileSystems.match(["gs://images/prep/_tmp/**"])[0].metadata_list == []
    assert not FileSystems.exists("gs://images/prep/_IN_PROGRESS")

    # Same records as a local run of the same files, but for the source uris they carry.
    assert preprocess.run(["--input", str(raw), "--output", str(tmp_path / "local"), *args]) == 0
    local = read_manifest(str(tmp_path / "local")).to_json()
    for name, entry in manifest["splits"].items():
        assert [s["path"] for s in entry["shards"]] == [
            s["path"] for s in local["splits"][name]["shards"]]
        for shard in entry["shards"]:
            with FileSystems.open(f"gs://images/prep/{shard['path']}") as handle:
                in_bucket = _records_without_uris(handle)
            with open(tmp_path / "local" / shard["path"], "rb") as handle:
                assert in_bucket == _records_without_uris(handle)


def _records_without_uris(handle) -> list[bytes]:
    from apache_beam.io.tfrecordio import _TFRecordUtil
    from tensorflow.core.example.example_pb2 import Example

    examples = []
    while (raw := _TFRecordUtil.read_record(handle)) is not None:
        example = Example.FromString(raw)
        del example.features.feature[records.SOURCE_ID]
        examples.append(example.SerializeToString(deterministic=True))
    return examples


def test_unreadable_bucket_is_a_clear_error(emulator, capsys):
    assert preprocess.run(["--input", "gs://no-such-bucket/raw", "--output", "/tmp/unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err

"""Glob characters in user paths: `[`, `*` and `?` are characters, never patterns.

Beam's FileSystems.match (and ReadFromText) read them as fnmatch patterns, so an input
`raw[1]` listed `raw1`'s files, and a --reuse_from `prev[1]` read `prev1`'s index.
"""

import json

import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import preprocess
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing.sources import list_class_folders, list_labels_csv, literal_pattern
from tests import corpus
from tests.support.gcs_emulator import GcsEmulator

ARGS = ["--image_size", "32,48", "--num_shards", "2", "--no_progress",
        "--direct_running_mode", "in_memory"]
NAMES = ("cat/a[1].jpg", "cat/b*.jpg", "cat/c?.jpg", "dog/d[!x].jpg", "dog/e.jpg")


def _write_images(root, seed: int = 0) -> list[str]:
    for index, name in enumerate(NAMES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(
            corpus.encode(corpus.noise(40, 50, seed + index), "JPEG", quality=90))
    return sorted(str(root / name) for name in NAMES)


@pytest.fixture
def lookalikes(tmp_path):
    """`raw[1]` beside `raw1` and `rawAx`: folders its name matches as a pattern."""
    for decoy in ("raw1", "raw*x", "rawAx"):
        _write_images(tmp_path / decoy, seed=50)
    return tmp_path


@pytest.mark.parametrize("folder", ["raw[1]", "raw*x", "raw?"])
def test_local_input_with_glob_characters_lists_only_itself(lookalikes, folder):
    expected = _write_images(lookalikes / folder)
    listing = list_class_folders(str(lookalikes / folder))
    assert [s.uri for s in listing.sources] == expected
    assert [s.labels for s in listing.sources] == [("cat",)] * 3 + [("dog",)] * 2


def test_literal_pattern_matches_only_the_path_itself(lookalikes):
    expected = _write_images(lookalikes / "raw[1]")
    found = FileSystems.match([literal_pattern(str(lookalikes / "raw[1]")) + "/**"])
    assert sorted(m.path for m in found[0].metadata_list) == expected


def test_names_with_glob_characters_are_read_and_reuse_from_is_literal(lookalikes):
    """Every file named with [ * ? is decoded; a --reuse_from `prev[1]` reads its own
    index, not `prev1`'s (which, here, does not exist: the run used to fail)."""
    raw = lookalikes / "raw[1]"
    _write_images(raw)
    previous = lookalikes / "prev[1]"
    # Written elsewhere, then moved: an --output with `[` is the output module's concern
    # (TensorFlow's SavedModel loader globs the tf.Transform temp folder under it).
    assert preprocess.run(["--input", str(raw), "--output", str(lookalikes / "prev"),
                           *ARGS]) == 0
    (lookalikes / "prev").rename(previous)
    manifest = read_manifest(str(previous)).to_json()
    assert manifest["accounting"]["images_written"] == len(NAMES)
    assert manifest["accounting"]["errors"] == 0
    out = lookalikes / "out"
    assert preprocess.run(["--input", str(raw), "--output", str(out), *ARGS,
                           "--reuse_from", str(previous)]) == 0
    assert read_manifest(str(out)).to_json()["accounting"]["reused"] == len(NAMES)


def test_labels_csv_uris_with_glob_characters_are_literal(lookalikes):
    expected = _write_images(lookalikes / "raw[1]")
    csv = lookalikes / "labels.csv"
    csv.write_text("uri,label\n" + "".join(f"raw[1]/{name},{name.split('/')[0]}\n"
                                           for name in NAMES))
    listing = list_labels_csv(str(csv))
    assert [s.uri for s in listing.sources] == expected
    assert not listing.skipped


@pytest.fixture(scope="module")
def emulator():
    with GcsEmulator() as running:
        running.create_bucket("images")
        yield running


def test_gs_input_with_glob_characters_lists_only_itself(emulator, tmp_path):
    local = tmp_path / "local"
    _write_images(local)
    for folder in ("raw[1]", "raw1", "raw*x", "rawAx"):
        emulator.upload_folder(str(local), f"gs://images/{folder}")
    for folder in ("raw[1]", "raw*x"):
        listing = list_class_folders(f"gs://images/{folder}")
        assert [s.uri for s in listing.sources] == sorted(
            f"gs://images/{folder}/{name}" for name in NAMES)


def test_gs_names_with_glob_characters_are_decoded(emulator, tmp_path):
    local = tmp_path / "local"
    _write_images(local)
    emulator.upload_folder(str(local), "gs://images/names")
    assert preprocess.run(["--input", "gs://images/names", "--output",
                           str(tmp_path / "out"), *ARGS]) == 0
    manifest = read_manifest(str(tmp_path / "out")).to_json()
    assert manifest["accounting"]["images_written"] == len(NAMES), json.dumps(manifest)

"""Never lose a user's data: ownership of the output, overlapping paths, one writer at a
time, and runs that fail say so. Every refused case leaves the tree byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from pipelines import preprocess
from pipelines.contract import manifest as manifest_lib
from pipelines.contract import ownership
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing.pipeline import CheckClaimOnce
from tests import corpus

ARGS = ["--image_size", "16", "--num_shards", "1", "--no_progress"]
REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, per_class: int = 4, broken: int = 0) -> Path:
    """`per_class` small JPEGs in two class folders, plus `broken` undecodable ones."""
    for label_index, label in enumerate(("cat", "dog")):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = corpus.noise(20, 24, seed=100 * label_index + i)
            (folder / f"img{i}.jpg").write_bytes(corpus.encode(image, "JPEG"))
    for i in range(broken):
        (root / "cat" / f"broken{i}.jpg").write_bytes(b"not a jpeg at all " * (i + 1))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with its content hash ('dir' for folders)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = ("dir" if path.is_dir() and not path.is_symlink()
                      else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def refused(args: list[str], capsys, expect: str) -> str:
    code = preprocess.run([*args, *ARGS])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- the reported data losses


def test_output_above_its_own_input_is_refused_and_nothing_is_touched(tmp_path, capsys):
    """`--input proj/data --output proj` deleted proj/data, then exited 0."""
    proj = tmp_path / "proj"
    make_images(proj / "data")
    before = tree_digest(proj)
    refused(["--input", str(proj / "data"), "--output", str(proj)], capsys, "overlaps --input")
    assert tree_digest(proj) == before


def test_a_users_folder_named_like_ours_is_not_taken_for_an_output(tmp_path, capsys):
    """`--output proj` where proj/data held the user's own files was emptied without
    --overwrite; not even --overwrite may touch it."""
    photos = make_images(tmp_path / "photos")
    proj = tmp_path / "proj"
    make_images(proj / "data")
    (proj / "data" / "notes.txt").write_text("mine")
    before = tree_digest(proj)
    for extra in ([], ["--overwrite"]):
        err = refused(["--input", str(photos), "--output", str(proj), *extra], capsys,
                      "not an output of this tool")
        assert "data" in err
        assert tree_digest(proj) == before


def test_a_manifest_that_is_not_ours_is_refused_even_with_overwrite(tmp_path, capsys):
    photos = make_images(tmp_path / "photos")
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "my app", "icons": []}))
    (app / "index").mkdir()
    (app / "index" / "main.js").write_text("console.log(1)")
    before = tree_digest(app)
    refused(["--input", str(photos), "--output", str(app), "--overwrite"], capsys,
            "not this tool's manifest.json")
    assert tree_digest(app) == before


def test_a_claim_file_that_is_not_ours_is_refused(tmp_path, capsys):
    photos = make_images(tmp_path / "photos")
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "keep.bin").write_bytes(b"\x00" * 10)
    (out / "_IN_PROGRESS").write_text("")  # an empty marker proves nothing
    before = tree_digest(out)
    refused(["--input", str(photos), "--output", str(out)], capsys, "not this tool's claim")
    assert tree_digest(out) == before


@pytest.fixture(scope="module")
def complete_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("complete")
    photos = make_images(root / "photos")
    out = root / "out"
    assert preprocess.run(["--input", str(photos), "--output", str(out), *ARGS]) == 0
    return photos, out


def test_overwrite_replaces_only_what_our_manifest_lists(complete_output, tmp_path, capsys):
    photos, out = complete_output
    copy = tmp_path / "out"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    manifest = read_manifest(str(copy)).to_json()
    assert manifest["entries"] == list(manifest_lib.OUTPUT_ENTRIES)
    # A complete output is not replaced without --overwrite.
    before = tree_digest(copy)
    refused(["--input", str(photos), "--output", str(copy)], capsys, "--overwrite")
    assert tree_digest(copy) == before
    # Something of the user's beside it: refused, even with --overwrite.
    (copy / "my_notes.txt").write_text("keep me")
    before = tree_digest(copy)
    err = refused(["--input", str(photos), "--output", str(copy), "--overwrite"], capsys,
                  "did not write")
    assert "my_notes.txt" in err and tree_digest(copy) == before
    (copy / "my_notes.txt").unlink()
    assert preprocess.run(["--input", str(photos), "--output", str(copy), "--overwrite",
                           *ARGS]) == 0
    assert read_manifest(str(copy)).to_json()["splits"] == manifest["splits"]


# ---------------------------------------------------------------- overlapping paths


def test_reuse_from_the_output_itself_is_refused_before_anything_is_deleted(
        complete_output, tmp_path, capsys):
    photos, out = complete_output
    before = tree_digest(out)
    refused(["--input", str(photos), "--output", str(out), "--reuse_from", str(out),
             "--overwrite"], capsys, "overlaps --reuse_from")
    refused(["--input", str(photos), "--output", str(out), "--overwrite", "--baseline_stats",
             str(out / "stats" / "statistics.pb")], capsys, "overlaps --baseline_stats")
    assert tree_digest(out) == before


def test_overlaps_are_found_through_relative_paths_and_symlinks(tmp_path, capsys,
                                                                monkeypatch):
    photos = make_images(tmp_path / "photos")
    (tmp_path / "link").symlink_to(photos)
    monkeypatch.chdir(tmp_path / "photos" / "cat")
    before = tree_digest(tmp_path / "photos")
    refused(["--input", str(tmp_path / "link"), "--output", "../prep"], capsys, "overlaps")
    refused(["--input", "..", "--output", str(tmp_path / "link" / "dog" / ".." / "out")],
            capsys, "overlaps")
    csv = tmp_path / "photos" / "labels.csv"
    csv.write_text("uri,label\ncat/img0.jpg,cat\n")
    refused(["--labels", str(csv), "--output", str(tmp_path / "photos" / "prep")], capsys,
            "overlaps --labels")
    csv.unlink()
    assert tree_digest(tmp_path / "photos") == before


@pytest.mark.parametrize("a, b, expected", [
    ("gs://b/run", "gs://b/run2", False),
    ("gs://b/run", "gs://b/run/data", True),
    ("gs://b/run/", "gs://b/run", True),
    ("gs://b", "gs://b/anything", True),
    ("gs://b/x", "gs://c/x", False),
    ("gs://b//x", "gs://b/x/", True),
    ("/tmp/a", "/tmp/ab", False),
    ("/tmp/a/../b", "/tmp/b/c", True),
])
def test_overlap_is_decided_on_folder_boundaries(a, b, expected):
    assert ownership.overlaps(a, b) is expected
    assert ownership.overlaps(b, a) is expected


# ---------------------------------------------------------------- one writer at a time


def test_a_live_claim_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path, capsys):
    photos = make_images(tmp_path / "photos")
    out = tmp_path / "out"
    held = ownership.claim_output(str(out), manifest_lib.OUTPUT_ENTRIES, False,
                                  manifest_lib.FORMAT_VERSION, run_id="first-run")
    (out / "data").mkdir()
    (out / "data" / "train-00000-of-00001.tfrecord").write_bytes(b"half a shard")
    before = tree_digest(out)
    err = refused(["--input", str(photos), "--output", str(out)], capsys, "in use by")
    assert "first-run" in err and tree_digest(out) == before
    held.release()  # as if that run died: the kernel drops its lock
    assert preprocess.run(["--input", str(photos), "--output", str(out), *ARGS]) == 0
    manifest = read_manifest(str(out)).to_json()
    shards = {s["path"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {f"data/{p.name}" for p in (out / "data").iterdir()} == shards
    assert not (out / "_IN_PROGRESS").exists()


def test_finalization_refuses_when_the_claim_was_taken_over(tmp_path):
    out = tmp_path / "out"
    with ownership.claim_output(str(out), manifest_lib.OUTPUT_ENTRIES, False,
                                manifest_lib.FORMAT_VERSION, run_id="mine"):
        ownership.check_still_ours(str(out), "mine")
        (out / "_IN_PROGRESS").write_bytes(ownership.ClaimRecord(
            run_id="theirs", entries=(), created_at=0.0).to_bytes())
        with pytest.raises(ownership.ClaimLost, match="theirs"):
            ownership.check_still_ours(str(out), "mine")


def test_two_concurrent_runs_one_completes_the_other_refuses(tmp_path):
    photos = make_images(tmp_path / "photos", per_class=6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipelines.preprocess", "--input", str(photos),
               "--output", str(out), *ARGS]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by" in loser or "already holds a complete output" in loser, loser
    manifest = read_manifest(str(out)).to_json()
    shards = {s["path"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {f"data/{p.name}" for p in (out / "data").iterdir()} == shards
    for path in shards:
        assert (out / path).stat().st_size == next(
            s["num_bytes"] for split in manifest["splits"].values() for s in split["shards"]
            if s["path"] == path)


def test_a_classic_template_runs_only_while_its_build_claim_is_there(tmp_path):
    out = tmp_path / "out"
    claim = ownership.claim_output(str(out), manifest_lib.OUTPUT_ENTRIES, False,
                                   manifest_lib.FORMAT_VERSION, run_id="template-build")
    claim.release()
    with BeamTestPipeline() as pipeline:  # the template's first run: its claim is there
        _ = pipeline | beam.Create([1, 2]) | beam.ParDo(
            CheckClaimOnce(str(out), "template-build"))
    (out / "_IN_PROGRESS").unlink()  # the first run finished and released it
    with pytest.raises(Exception, match="has already run"):
        with BeamTestPipeline() as pipeline:
            _ = pipeline | beam.Create([1, 2]) | beam.ParDo(
                CheckClaimOnce(str(out), "template-build"))


# ---------------------------------------------------------------- failures that say so


def test_a_run_where_every_file_fails_exits_nonzero_without_a_manifest(tmp_path, capsys):
    raw = tmp_path / "raw"
    for label in ("cat", "dog"):
        (raw / label).mkdir(parents=True)
        for i in range(3):
            (raw / label / f"x{i}.jpg").write_bytes(b"garbage" * (i + 1))
    out = tmp_path / "out"
    code = preprocess.run(["--input", str(raw), "--output", str(out), *ARGS])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "no image was written" in err and "top reasons: " in err, err
    assert "errors/errors.jsonl" in err and "Traceback" not in err, err
    assert not (out / "manifest.json").exists()
    assert len((out / "errors" / "errors.jsonl").read_text().splitlines()) == 6
    # The failed output is ours: fixing the input and rerunning takes it over.
    for path in raw.rglob("x*.jpg"):
        path.unlink()
    make_images(raw)
    assert preprocess.run(["--input", str(raw), "--output", str(out), *ARGS]) == 0


def test_the_error_budget_passes_a_few_corrupt_files_and_fails_many(tmp_path, capsys):
    raw = make_images(tmp_path / "raw", per_class=10, broken=1)  # 1 of 21: 4.8%
    assert preprocess.run(["--input", str(raw), "--output", str(tmp_path / "ok"), *ARGS]) == 0
    assert read_manifest(str(tmp_path / "ok")).to_json()["accounting"]["errors"] == 1
    capsys.readouterr()
    code = preprocess.run(["--input", str(raw), "--output", str(tmp_path / "strict"), *ARGS,
                           "--max_error_rate", "0.01"])
    err = capsys.readouterr().err
    assert code == 1 and "over --max_error_rate 0.01" in err, err
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_staged_wheel_folders_are_removed_without_atexit():
    from pipelines.cloud import dataflow

    folder = dataflow._scratch_dir()
    assert os.path.isdir(folder)
    dataflow.remove_scratch_dirs()
    assert not os.path.exists(folder)


# ---------------------------------------------------------------- gs:// (fake-gcs-server)


@pytest.fixture(scope="module")
def gcs():
    from tests.support.gcs_emulator import GcsEmulator

    with GcsEmulator() as emulator:
        emulator.create_bucket("safety")
        yield emulator


def _gcs_tree(prefix: str) -> dict[str, str]:
    bucket, name = ownership.split_gcs(prefix)
    blobs = ownership.gcs_client().list_blobs(bucket, prefix=name + "/")
    return {blob.name: hashlib.sha256(blob.download_as_bytes()).hexdigest() for blob in blobs}


def _gcs_put(path: str, data: bytes) -> None:
    ownership.gcs_write(path, data, if_generation_match=None)


def test_gcs_objects_that_are_not_ours_are_refused_untouched(gcs, tmp_path, capsys):
    photos = make_images(tmp_path / "photos")
    _gcs_put("gs://safety/proj/data/cat/a.jpg", b"user image")
    _gcs_put("gs://safety/proj/data/notes.txt", b"user notes")
    before = _gcs_tree("gs://safety/proj")
    for extra in ([], ["--overwrite"]):
        refused(["--input", str(photos), "--output", "gs://safety/proj", *extra], capsys,
                "not an output of this tool")
    refused(["--input", "gs://safety/proj/data", "--output", "gs://safety/proj"], capsys,
            "overlaps --input")
    assert _gcs_tree("gs://safety/proj") == before


def test_gcs_lease_live_refuses_expired_is_taken_over_once(gcs):
    root = "gs://safety/leased"
    first = ownership.claim_output(root, manifest_lib.OUTPUT_ENTRIES, False,
                                   manifest_lib.FORMAT_VERSION, run_id="first", lease_s=0.6)
    generation = first._generation
    try:
        import time

        time.sleep(1.0)  # two renewals
        assert first._generation != generation and first.lost is None
        with pytest.raises(ownership.OutputRefused, match="first"):
            ownership.claim_output(root, manifest_lib.OUTPUT_ENTRIES, False,
                                   manifest_lib.FORMAT_VERSION, run_id="second")
    finally:
        first.release()
    _gcs_put(root + "/data/shard", b"left by the dead run")
    # Its lease runs out without renewals: the claim is stale and is taken over.
    stale = ownership.ClaimRecord(run_id="first", entries=manifest_lib.OUTPUT_ENTRIES,
                                  created_at=0.0, expires_at=1.0)
    _gcs_put(ownership.claim_path(root), stale.to_bytes())
    with ownership.claim_output(root, manifest_lib.OUTPUT_ENTRIES, False,
                                manifest_lib.FORMAT_VERSION, run_id="second") as second:
        ownership.check_still_ours(root, "second")
        assert set(_gcs_tree(root)) == {"leased/_IN_PROGRESS"}  # the dead run's shard is gone
        with pytest.raises(ownership.ClaimLost):
            ownership.check_still_ours(root, "first")
        # A writer holding an older generation loses the race instead of overwriting.
        with pytest.raises(ownership.PreconditionFailed):
            ownership.gcs_write(second.path, b"{}", if_generation_match=1)


@pytest.mark.parametrize("name", ["out[1]", "out*", "out?"])
def test_output_paths_with_glob_characters_are_refused(name, tmp_path, capsys):
    photos = make_images(tmp_path / "photos")
    refused(["--input", str(photos), "--output", str(tmp_path / name)], capsys,
            "may not hold [, * or ?")
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("change, message", [
    ({"format_version": 2}, "format_version 2, this code reads 1"),
    ({"splits": None}, "keys missing: splits"),
])
def test_reading_a_manifest_of_another_version_or_shape_is_a_clear_error(change, message,
                                                                         tmp_path):
    manifest = {key: {} for key in ownership.MANIFEST_KEYS} | {"format_version": 1}
    manifest.update(change)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {k: v for k, v in manifest.items() if v is not None}))
    with pytest.raises(manifest_lib.ManifestError, match=message):
        read_manifest(str(tmp_path)).to_json()

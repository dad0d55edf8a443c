"""The preprocessing command end to end on a corpus made here, on the real DirectRunner."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from pipelines import preprocess
from pipelines.contract import ownership, records
from pipelines.contract.manifest import OUTPUT_ENTRIES, read_manifest
from tests import corpus

ARGS = ["--image_size", "32,48", "--num_shards", "3", "--no_progress", *corpus.ERROR_BUDGET_ARGS]


def run_ok(*args: str) -> None:
    assert preprocess.run(list(args)) == 0


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return root, corpus.write_corpus(root)


@pytest.fixture(scope="module")
def output(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    run_ok("--input", str(corpus_dir[0]), "--output", str(out), *ARGS)
    return out


def read_split(out, manifest, split):
    paths = [str(out / s["path"]) for s in manifest["splits"][split]["shards"]]
    rows = []
    for path in paths:
        for raw in tf.data.TFRecordDataset(path):
            parsed = tf.io.parse_single_example(raw, records.FEATURE_SPEC)
            rows.append((path, {k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor)
                                    else v).numpy() for k, v in parsed.items()}))
    return rows


def test_every_file_is_accounted_for(output, corpus_dir):
    manifest = read_manifest(str(output)).to_json()
    assert {k: manifest["accounting"][k] for k in corpus_dir[1]} == corpus_dir[1]
    errors = [json.loads(line) for line in (output / manifest["errors_path"]).open()]
    reasons = {e["uri"].rsplit("/", 1)[1]: e["reason"] for e in errors}
    assert reasons == {name: reason for name, (_, reason) in corpus.broken_files().items()}
    assert all(e["stage"] == "decode" for e in errors)
    assert [s["reason"] for s in manifest["skipped"]] == ["not_an_image_name"]
    assert not (output / "_tmp").exists() and not (output / "_IN_PROGRESS").exists()


def test_records_follow_the_contract_and_carry_duplicates_once(output):
    manifest = read_manifest(str(output)).to_json()
    rows = [r for split in manifest["splits"] for _, r in read_split(output, manifest, split)]
    assert len(rows) == manifest["accounting"]["images_written"]
    assert len({r[records.SHA256] for r in rows}) == len(rows)
    merged = [r for r in rows if len(r[records.SOURCE_ID]) > 1]
    assert len(merged) == 1
    assert sorted(u.decode().rsplit("/", 2)[1] for u in merged[0][records.SOURCE_ID]) == [
        "cat", "dog", "dog"]
    assert [manifest["labels"][i] for i in merged[0][records.LABEL]] == ["cat", "dog"]
    for row in rows:
        assert (row[records.HEIGHT], row[records.WIDTH]) == (32, 48)
        assert row[records.FORMAT] == b"jpeg"
        image = tf.io.decode_jpeg(row[records.ENCODED]).numpy()
        assert image.shape == (32, 48, 3)


def test_exif_rotated_image_is_stored_upright(output):
    manifest = read_manifest(str(output)).to_json()
    rows = [r for split in manifest["splits"] for _, r in read_split(output, manifest, split)]
    (rotated,) = [r for r in rows if r[records.SOURCE_ID][0].endswith(b"rotated.jpg")]
    assert (rotated[records.ORIGINAL_HEIGHT], rotated[records.ORIGINAL_WIDTH]) == (40, 60)
    pixels = tf.io.decode_jpeg(rotated[records.ENCODED]).numpy().astype(int)
    left, right = pixels[:, :20].mean(axis=(0, 1)), pixels[:, 28:].mean(axis=(0, 1))
    assert left[0] > 170 and left[2] < 70 and right[2] > 170 and right[0] < 70


def test_shards_are_balanced_and_splits_disjoint(output):
    manifest = read_manifest(str(output)).to_json()
    seen = {}
    for split, entry in manifest["splits"].items():
        sizes = [s["num_examples"] for s in entry["shards"]]
        assert not sizes or max(sizes) - min(sizes) <= 1, (split, sizes)
        for _, row in read_split(output, manifest, split):
            assert seen.setdefault(row[records.SHA256], split) == split
        counts = Counter(manifest["labels"][i] for _, r in read_split(output, manifest, split)
                         for i in r[records.LABEL])
        assert dict(counts) == {k: v for k, v in entry["class_counts"].items() if v}
    assert len(manifest["splits"]["train"]["shards"]) == 3


def test_rerun_is_byte_identical_and_independent_of_parallelism(output, corpus_dir, tmp_path):
    # The fixture ran the default (in_memory, a decode thread per core); this runs bundles
    # on two runner threads with one decode thread each.
    again = tmp_path / "again"
    run_ok("--input", str(corpus_dir[0]), "--output", str(again), *ARGS,
           "--direct_running_mode", "multi_threading", "--direct_num_workers", "2",
           "--decode_threads", "1")
    first, second = read_manifest(str(output)).to_json(), read_manifest(str(again)).to_json()
    assert first["splits"] == second["splits"]
    for entry in first["splits"].values():
        for shard in entry["shards"]:
            assert (output / shard["path"]).read_bytes() == (again / shard["path"]).read_bytes()


def test_existing_output_refused_then_replaced_with_overwrite(output, corpus_dir, capsys):
    code = preprocess.run(["--input", str(corpus_dir[0]), "--output", str(output), *ARGS])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_killed_run_leftovers_are_cleaned_and_never_look_complete(corpus_dir, tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train-00000-of-00009.tfrecord").write_bytes(b"half")
    # The claim a killed run left (nobody holds its lock any more).
    (out / "_IN_PROGRESS").write_bytes(ownership.ClaimRecord(
        run_id="killed", entries=OUTPUT_ENTRIES, created_at=0.0).to_bytes())
    with pytest.raises(FileNotFoundError):
        read_manifest(str(out)).to_json()
    run_ok("--input", str(corpus_dir[0]), "--output", str(out), *ARGS, "--splits",
           "train=0.5,test=0.5", "--direct_running_mode", "in_memory")
    assert not (out / "data" / "train-00000-of-00009.tfrecord").exists()
    manifest = read_manifest(str(out)).to_json()
    assert set(manifest["splits"]) == {"train", "test"}
    run_ok("--input", str(corpus_dir[0]), "--output", str(out), *ARGS, "--overwrite",
           "--direct_running_mode", "in_memory")
    assert set(read_manifest(str(out)).to_json()["splits"]) == {"train", "validation", "test"}


def test_labels_csv_gives_several_labels_to_one_image(corpus_dir, tmp_path):
    root = corpus_dir[0]
    csv = tmp_path / "labels.csv"
    (tmp_path / "imgs").symlink_to(root)  # relative uris resolve against the CSV's folder
    csv.write_text("uri,label\n"
                   "imgs/dog/photo0.jpg,dog\n"
                   "imgs/dog/photo0.jpg,outdoor\n"
                   f"{tmp_path / 'imgs' / 'cat' / 'photo1.jpg'},cat\n")  # absolute, in root
    out = tmp_path.parent / f"{tmp_path.name}-out"  # not inside the CSV's folder
    run_ok("--labels", str(csv), "--output", str(out), *ARGS, "--direct_running_mode",
           "in_memory")
    manifest = read_manifest(str(out)).to_json()
    assert manifest["labels"] == ["cat", "dog", "outdoor"]
    assert manifest["accounting"]["images_written"] == 2
    assert manifest["accounting"]["label_conflicts"] == 0


@pytest.mark.parametrize("args, message", [
    (["--input", "/nonexistent/raw", "--output", "/tmp/x"], "no files found"),
    (["--input", "/tmp", "--output", "/tmp/x", "--image_size", "0"], "--image_size"),
    (["--input", "/tmp", "--output", "/tmp/x", "--splits", "train=0.5"], "sum to 1"),
    (["--input", "/tmp", "--output", "/tmp/x", "--no_such_flag", "1"], "unknown option"),
    (["--output", "/tmp/x"], "give --input"),
])
def test_usage_errors_are_one_line_messages(args, message, capsys):
    assert preprocess.run(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_stored_pixels_match_imaging_module(output, corpus_dir):
    """The shards hold exactly what pipelines.contract.imaging makes of the source file."""
    from pipelines.contract.imaging import ImageSpec, process_image

    manifest = read_manifest(str(output)).to_json()
    rows = [r for split in manifest["splits"] for _, r in read_split(output, manifest, split)]
    row = next(r for r in rows if r[records.SOURCE_ID][0].endswith(b"photo3.jpg"))
    source = (corpus_dir[0] / "cat" / "photo3.jpg").read_bytes()
    expected = process_image(source, ImageSpec(32, 48)).encoded
    assert row[records.ENCODED] == expected
    assert np.array_equal(tf.io.decode_jpeg(expected).numpy(),
                          tf.io.decode_jpeg(row[records.ENCODED]).numpy())


def test_reuse_from_earlier_output_skips_decoding_and_gives_identical_shards(
        output, corpus_dir, tmp_path):
    """Only new content is decoded; the shards equal a from-scratch run's byte for byte."""
    raw = tmp_path / "raw"
    shutil.copytree(corpus_dir[0], raw)
    (raw / "cat" / "new.png").write_bytes(corpus.encode(corpus.noise(50, 70, 999), "PNG"))
    incremental, scratch = tmp_path / "incremental", tmp_path / "scratch"
    run_ok("--input", str(raw), "--output", str(incremental), *ARGS, "--reuse_from", str(output))
    run_ok("--input", str(raw), "--output", str(scratch), *ARGS)
    first = read_manifest(str(incremental)).to_json()
    assert first["accounting"]["reused"] == first["accounting"]["images_written"] - 1
    assert read_manifest(str(scratch)).to_json()["accounting"]["reused"] == 0
    for entry in first["splits"].values():
        for shard in entry["shards"]:
            assert _without_uris(incremental / shard["path"]) == _without_uris(
                scratch / shard["path"])


def _without_uris(path) -> list[bytes]:
    rows = []
    for raw in tf.data.TFRecordDataset(str(path)):
        example = tf.train.Example.FromString(raw.numpy())
        del example.features.feature[records.SOURCE_ID]
        rows.append(example.SerializeToString(deterministic=True))
    return rows


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """Good images only, an earlier output of them and a from-scratch output of them."""
    root = tmp_path_factory.mktemp("reuse")
    raw = root / "raw"
    for index in range(9):
        folder = raw / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"p{index}.jpg").write_bytes(
            corpus.encode(corpus.noise(40, 50, 300 + index), "JPEG", quality=90))
    run_ok("--input", str(raw), "--output", str(root / "earlier"), *ARGS)
    run_ok("--input", str(raw), "--output", str(root / "scratch"), *ARGS)
    return raw, root / "earlier", root / "scratch"


def _corrupt(earlier, how: str) -> int:
    """Damages the earlier output; returns how many of its images no longer verify."""
    index = earlier / "index" / "images.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    first = rows[0]
    shard = earlier / first["path"]
    data = bytearray(shard.read_bytes())
    if how == "changed_byte":
        data[first["offset"] + first["length"] // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return 1
    if how == "truncated_shard":
        shard.write_bytes(bytes(data[: first["offset"] + first["length"] - 1]))
        return sum(row["path"] == first["path"] for row in rows)
    if how == "deleted_shard":
        shard.unlink()
        return sum(row["path"] == first["path"] for row in rows)
    assert how == "index_without_hashes"  # written before the index held them
    for row in rows:
        del row["stored_sha256"]
    index.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    return len(rows)


@pytest.mark.parametrize("how", ["changed_byte", "truncated_shard", "deleted_shard",
                                 "index_without_hashes"])
def test_reuse_verifies_earlier_bytes_and_decodes_what_does_not_match(clean_runs, tmp_path, how):
    """--reuse_from copies only bytes whose sha256 and length match the earlier index;
    the rest are decoded again: the output equals a from-scratch run's, byte for byte."""
    raw, pristine, scratch = clean_runs
    earlier = tmp_path / "earlier"
    shutil.copytree(pristine, earlier)
    unverified = _corrupt(earlier, how)
    out = tmp_path / "out"
    run_ok("--input", str(raw), "--output", str(out), *ARGS, "--reuse_from", str(earlier))
    manifest, expected = read_manifest(str(out)).to_json(), read_manifest(str(scratch)).to_json()
    written = manifest["accounting"]["images_written"]
    assert 0 < unverified <= written
    assert manifest["accounting"]["reused"] == written - unverified
    assert manifest["accounting"]["reuse_mismatches"] == (
        0 if how == "index_without_hashes" else unverified)
    assert manifest["splits"] == expected["splits"]
    for relative in [s["path"] for e in expected["splits"].values() for s in e["shards"]] + [
            "index/images.jsonl"]:
        assert (out / relative).read_bytes() == (scratch / relative).read_bytes(), relative

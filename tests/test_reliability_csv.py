"""Hostile labels CSVs: escaping uris, other schemes and buckets, malformed rows, bad labels.

Every rejected row is a skipped entry `<csv>#L<line>` with a reason code, counted in the
manifest's accounting; a rejected uri is never read.
"""

from __future__ import annotations

import json
import unicodedata

import pytest

from pipelines import preprocess
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing.sources import (
    MAX_LABEL_CHARS,
    _Rejected,
    clean_label,
    label_problem,
    list_class_folders,
    list_labels_csv,
    resolve_uri,
)
from tests import corpus
from tests.support.gcs_emulator import GcsEmulator

JPEG = corpus.encode(corpus.noise(40, 60, 1), "JPEG", quality=90)
JPEG2 = corpus.encode(corpus.noise(40, 60, 2), "JPEG", quality=90)
SECRET = corpus.encode(corpus.noise(40, 60, 3), "JPEG", quality=90)


@pytest.fixture
def layout(tmp_path):
    """tmp/data/{labels.csv, imgs/cat/a.jpg, imgs/dog/b.jpg}; tmp/outside/secret.jpg."""
    data = tmp_path / "data"
    (data / "imgs" / "cat").mkdir(parents=True)
    (data / "imgs" / "dog").mkdir(parents=True)
    (data / "imgs" / "cat" / "a.jpg").write_bytes(JPEG)
    (data / "imgs" / "dog" / "b.jpg").write_bytes(JPEG2)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(SECRET)
    return tmp_path


# (row as written in the file, reason it is skipped or None if accepted)
HOSTILE_ROWS = [
    ("imgs/cat/a.jpg,cat", None),
    ("imgs/./cat/a.jpg,outdoor", None),  # the same file: a second label
    ("imgs/dog/b.jpg,  dog  ", None),
    ("../outside/secret.jpg,cat", "uri_outside_root"),
    ("imgs/cat/../../../outside/secret.jpg,cat", "uri_outside_root"),
    ("../../../../../../etc/passwd,cat", "uri_outside_root"),
    ("/etc/passwd,cat", "uri_outside_root"),
    ("{outside}/secret.jpg,cat", "uri_outside_root"),  # absolute, elsewhere
    ("gs://other-bucket/x.jpg,cat", "uri_outside_root"),
    ("file:///etc/passwd,cat", "uri_scheme_not_allowed"),
    ("file:imgs/cat/a.jpg,cat", "uri_scheme_not_allowed"),
    ("http://169.254.169.254/computeMetadata/v1/x.jpg,cat", "uri_scheme_not_allowed"),
    ("imgs/dog/b\x07.jpg,dog", "uri_control_characters"),
    ("imgs/dog/b.jpg,", "malformed_csv_row"),
    (",dog", "malformed_csv_row"),
    ("imgs/dog/b.jpg", "malformed_csv_row"),
    ("imgs/dog/b.jpg,dog,extra", "malformed_csv_row"),
    ('"imgs/dog/b.jpg,dog', "malformed_csv_row"),  # unbalanced quote: only this line
    ("imgs/dog/b.jpg," + "x" * 200_000, "malformed_csv_row"),  # over csv.field_size_limit
    ("imgs/dog/b.jpg," + "x" * (MAX_LABEL_CHARS + 1), "label_too_long"),
    ("imgs/dog/b.jpg,do\x00g", "label_control_characters"),
    ("imgs/dog/b.jpg,do\tg", "label_control_characters"),
    ("imgs/dog/b.jpg,dog\u2028cat", "label_control_characters"),  # line separator
    ("imgs/dog/b.jpg,dog\u202ecat", "label_control_characters"),  # right-to-left override
    ("imgs/dog/b.jpg,dog\u200b", "label_control_characters"),  # zero-width space
    ("imgs/dog/b.jpg,dog\x1ecat", "label_control_characters"),  # record separator
    ("imgs/dog/b.jpg,\"<b>dog</b>, \"\"big\"\"\"", None),  # odd but printable: kept as is
    ("imgs/dog/b.jpg,cafe\u0301", None),  # decomposed accent, as macOS writes it
    ("imgs/cat/a.jpg,caf\u00e9", None),  # composed: the same label
]


def _write_csv(layout, rows) -> str:
    text = "uri,label\n" + "\n".join(rows).format(outside=layout / "outside") + "\n"
    path = layout / "data" / "labels.csv"
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def test_hostile_rows_are_skipped_with_their_reason(layout):
    csv_uri = _write_csv(layout, [row for row, _ in HOSTILE_ROWS])
    listing = list_labels_csv(csv_uri)
    reasons = {s.uri: s.reason for s in listing.skipped}
    for line, (row, reason) in enumerate(HOSTILE_ROWS, start=2):
        assert reasons.get(f"{csv_uri}#L{line}") == reason, (line, row)
    data = layout / "data" / "imgs"
    assert {s.uri: s.labels for s in listing.sources} == {
        str(data / "cat" / "a.jpg"): ("café", "cat", "outdoor"),
        str(data / "dog" / "b.jpg"): ('<b>dog</b>, "big"', "café", "dog"),
    }
    assert listing.files_seen == 2 + sum(reason is not None for _, reason in HOSTILE_ROWS)


def test_hostile_csv_end_to_end_never_reads_outside_and_accounts_for_every_row(layout):
    csv_uri = _write_csv(layout, [row for row, _ in HOSTILE_ROWS])
    out = layout / "out"
    assert preprocess.run(["--labels", csv_uri, "--output", str(out), "--image_size", "32",
                           "--num_shards", "1", "--no_progress",
                           "--direct_running_mode", "in_memory"]) == 0
    manifest = read_manifest(str(out)).to_json()
    rejected = sum(reason is not None for _, reason in HOSTILE_ROWS)
    accounting = manifest["accounting"]
    assert accounting["images_written"] == 2 and accounting["errors"] == 0
    assert accounting["skipped"] == rejected == len(manifest["skipped"])
    assert accounting["files_seen"] == 2 + rejected
    assert manifest["labels"] == sorted(['<b>dog</b>, "big"', "café", "cat", "dog", "outdoor"])
    assert all(unicodedata.is_normalized("NFC", label) for label in manifest["labels"])
    # Never read: the secret image is not stored, /etc/passwd is no dead letter.
    assert (out / "errors" / "errors.jsonl").read_text() == ""
    index = [json.loads(line) for line in (out / "index" / "images.jsonl").open()]
    assert len(index) == 2
    report = (out / "stats" / "report.html").read_text()
    assert "<b>dog</b>" not in report  # labels are escaped where a person reads them


def test_input_flag_sets_the_allowed_root(layout):
    """--input with --labels: uris must lie under --input instead of the CSV's folder."""
    csv_uri = _write_csv(layout, ["imgs/cat/a.jpg,cat", "{outside}/secret.jpg,secret"])
    outside = str(layout / "outside")
    listing = list_labels_csv(csv_uri, allowed_root=outside)
    assert [s.uri for s in listing.sources] == [f"{outside}/secret.jpg"]
    assert [s.reason for s in listing.skipped] == ["uri_outside_root"]


@pytest.mark.parametrize("uri, expected", [
    ("img/a.jpg", "gs://bucket/meta/img/a.jpg"),
    ("./img/../img/a.jpg", "gs://bucket/meta/img/a.jpg"),
    ("gs://bucket/meta/a.jpg", "gs://bucket/meta/a.jpg"),
    ("../raw/a.jpg", "uri_outside_root"),
    ("gs://bucket/meta/../raw/a.jpg", "uri_outside_root"),
    ("gs://bucket/metadata/a.jpg", "uri_outside_root"),  # a prefix, not a folder
    ("gs://other-bucket/meta/a.jpg", "uri_outside_root"),
    ("gs://bucket/../other/meta/a.jpg", "uri_outside_root"),  # climbing out of the bucket
    ("gs://bucket", "uri_outside_root"),
    ("/etc/passwd", "uri_outside_root"),  # a local path in a gs:// CSV
    ("GS://bucket/meta/a.jpg", "uri_scheme_not_allowed"),
    ("gs:/bucket/meta/a.jpg", "uri_scheme_not_allowed"),
    ("s3://bucket/meta/a.jpg", "uri_scheme_not_allowed"),
    ("file:///etc/passwd", "uri_scheme_not_allowed"),
    ("img/" + "a" * 2000 + ".jpg", "uri_too_long"),
    ("img/a\n.jpg", "uri_control_characters"),
])
def test_gcs_uris_stay_under_the_csvs_prefix(uri, expected):
    try:
        resolved = resolve_uri("gs://bucket/meta", uri, "gs://bucket/meta")
    except _Rejected as rejected:
        resolved = rejected.reason
    assert resolved == expected


def test_gcs_csv_with_input_root(tmp_path):
    """A CSV in gs://bucket/meta naming images in gs://bucket/raw (given as --input)."""
    with GcsEmulator() as emulator:
        emulator.create_bucket("hostile-bucket")
        emulator.create_bucket("secret-bucket")
        rows = ["uri,label", "../raw/cat/a.jpg,cat", "gs://hostile-bucket/raw/dog/b.jpg,dog",
                "gs://secret-bucket/raw/x.jpg,cat", "gs://hostile-bucket/meta/c.jpg,cat",
                "file:///etc/passwd,cat"]
        blob = emulator.client.bucket("hostile-bucket").blob("meta/labels.csv")
        blob.upload_from_string("\n".join(rows) + "\n")
        listing = list_labels_csv("gs://hostile-bucket/meta/labels.csv",
                                  allowed_root="gs://hostile-bucket/raw")
    assert [s.uri for s in listing.sources] == ["gs://hostile-bucket/raw/cat/a.jpg",
                                                "gs://hostile-bucket/raw/dog/b.jpg"]
    assert sorted(s.reason for s in listing.skipped) == [
        "uri_outside_root", "uri_outside_root", "uri_scheme_not_allowed"]


def test_class_folder_names_get_the_same_label_rules(tmp_path):
    for folder in ("cat", "do\tg", "cafe\u0301"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(JPEG)
    listing = list_class_folders(str(tmp_path))
    assert sorted(s.labels[0] for s in listing.sources) == ["café", "cat"]
    assert [s.reason for s in listing.skipped] == ["label_control_characters"]


def test_label_rules():
    assert clean_label("  cafe\u0301 ") == "caf\u00e9"
    assert label_problem("dog") is None and label_problem("chien d'arrêt 🐕") is None
    assert label_problem(" ") == "malformed_csv_row"
    assert label_problem("x" * (MAX_LABEL_CHARS + 1)) == "label_too_long"
    assert label_problem("a\rb") == "label_control_characters"


def test_a_csv_of_only_rejected_rows_is_a_usage_error(layout, capsys):
    csv_uri = _write_csv(layout, ["/etc/passwd,cat", "file:///etc/shadow,cat"])
    assert preprocess.run(["--labels", csv_uri, "--output", str(layout / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no image files") and "Traceback" not in err

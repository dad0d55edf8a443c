"""Beam's FileSystems round-trips against the embedded fake-gcs-server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from tests.support import gcs_emulator
from tests.support.gcs_emulator import EmulatorError, GcsEmulator, add_batch_content_ids

BUCKET = "demo"
ENV_KEYS = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")


@pytest.fixture(scope="module")
def emulator() -> Iterator[GcsEmulator]:
    # One server for the module: starting it is cheap, but Beam's first GCS call is not.
    with GcsEmulator() as running:
        running.create_bucket(BUCKET)
        yield running


def _paths(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def test_env_points_at_the_emulator(emulator: GcsEmulator) -> None:
    assert emulator.url.startswith("http://127.0.0.1:")
    assert os.environ["STORAGE_EMULATOR_HOST"] == emulator.url
    assert {key: os.environ[key] for key in ENV_KEYS} == emulator.env
    assert Path(os.environ["GOOGLE_APPLICATION_CREDENTIALS"]).is_file()


def test_upload_folder_then_match_and_open(emulator: GcsEmulator, tmp_path: Path) -> None:
    (tmp_path / "cat" / "deep").mkdir(parents=True)
    (tmp_path / "cat" / "a.jpg").write_bytes(b"cat-a")
    (tmp_path / "cat" / "deep" / "b.jpg").write_bytes(b"cat-b")
    (tmp_path / "dog.jpg").write_bytes(b"dog")

    uploaded = emulator.upload_folder(tmp_path, f"gs://{BUCKET}/raw")

    expected = [
        f"gs://{BUCKET}/raw/cat/a.jpg",
        f"gs://{BUCKET}/raw/cat/deep/b.jpg",
        f"gs://{BUCKET}/raw/dog.jpg",
    ]
    assert uploaded == expected
    assert _paths(f"gs://{BUCKET}/raw/**") == expected
    assert _read(f"gs://{BUCKET}/raw/cat/deep/b.jpg") == b"cat-b"


def test_create_then_read_3mb_and_seek(emulator: GcsEmulator) -> None:
    data = os.urandom(3 * 1024 * 1024)
    path = f"gs://{BUCKET}/big/blob.bin"

    _write(path, data)

    assert FileSystems.exists(path)
    assert _read(path) == data
    with FileSystems.open(path) as handle:
        handle.seek(2 * 1024 * 1024 + 7)
        assert handle.read(1000) == data[2 * 1024 * 1024 + 7 : 2 * 1024 * 1024 + 1007]
        handle.seek(10)
        assert handle.read(5) == data[10:15]


def test_rename_moves_several_files(emulator: GcsEmulator) -> None:
    # Rename is a batch copy + batch delete: the path the proxy exists for.
    sources = [f"gs://{BUCKET}/tmp/{name}" for name in ("a", "b")]
    targets = [f"gs://{BUCKET}/final/{name}" for name in ("a", "b")]
    for source in sources:
        _write(source, source.encode())

    FileSystems.rename(sources, targets)

    assert not any(FileSystems.exists(source) for source in sources)
    assert [_read(target) for target in targets] == [source.encode() for source in sources]


def test_delete_files_and_folder(emulator: GcsEmulator) -> None:
    files = [f"gs://{BUCKET}/trash/{name}" for name in ("x", "y", "sub/z")]
    for path in files:
        _write(path, b"junk")

    FileSystems.delete(files[:2])
    assert _paths(f"gs://{BUCKET}/trash/**") == [files[2]]

    FileSystems.delete([f"gs://{BUCKET}/trash/"])  # trailing slash: recursive in Beam
    assert _paths(f"gs://{BUCKET}/trash/**") == []
    assert not FileSystems.exists(files[2])


def test_beam_pipeline_writes_to_the_emulator(emulator: GcsEmulator) -> None:
    # A file sink writes temp files and renames them when it finalizes.
    output = f"gs://{BUCKET}/pipeline/part"
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as pipeline:
        _ = pipeline | beam.Create(["b", "a", "c"]) | beam.io.WriteToText(output, num_shards=1)

    assert _paths(f"gs://{BUCKET}/pipeline/**") == [f"{output}-00000-of-00001"]
    assert sorted(_read(f"{output}-00000-of-00001").split()) == [b"a", b"b", b"c"]


def test_subprocess_inherits_the_emulator(emulator: GcsEmulator) -> None:
    # Pipeline workers are subprocesses; the environment alone must be enough.
    path = f"gs://{BUCKET}/from_child.txt"
    code = (
        "from apache_beam.io.filesystems import FileSystems as F\n"
        f"with F.create({path!r}) as h: h.write(b'child')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    assert _read(path) == b"child"


def test_env_is_restored_on_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://elsewhere:1")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    with GcsEmulator() as running:
        assert os.environ["STORAGE_EMULATOR_HOST"] == running.url

    assert os.environ["STORAGE_EMULATOR_HOST"] == "http://elsewhere:1"
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ


def test_a_server_that_dies_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcs_emulator, "fake_gcs_server_binary", lambda: Path("/bin/false"))
    before = os.environ.get("STORAGE_EMULATOR_HOST")

    with pytest.raises(EmulatorError, match="exited with code 1"), GcsEmulator():
        pass

    assert os.environ.get("STORAGE_EMULATOR_HOST") == before


def test_add_batch_content_ids_numbers_parts_without_one() -> None:
    content_type = 'multipart/mixed; boundary="==b=="'
    body = (
        b"--==b==\nContent-Type: application/http\n\nDELETE /x HTTP/1.1\n\n\n"
        b"--==b==\nContent-Type: application/http\nContent-ID: <mine>\n\nDELETE /y HTTP/1.1\n\n\n"
        b"--==b==--"
    )

    fixed = add_batch_content_ids(body, content_type)

    assert fixed.count(b"Content-ID: <item0>") == 1
    assert b"<item1>" not in fixed  # the part that had an id keeps it
    assert fixed.count(b"Content-ID:") == 2
    assert fixed.endswith(b"--==b==--")

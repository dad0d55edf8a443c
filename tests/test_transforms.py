"""The Beam steps on a handful of real files, with TestPipeline + assert_that."""

import dataclasses
import errno
import json

import apache_beam as beam
import pytest
import requests
from apache_beam.io.filesystem import BeamIOError
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.api_core import exceptions as google_errors

from pipelines.contract.imaging import ImageSpec
from pipelines.preprocessing import transforms
from pipelines.preprocessing.options import PreprocessConfig
from pipelines.preprocessing.sources import SourceFile
from pipelines.preprocessing.transforms import (
    ERRORS_TAG,
    DecodeSourceFn,
    MergeDuplicates,
    plan_shards,
)
from tests import corpus


@pytest.mark.parametrize("threads, processes", [(1, 0), (3, 0), (1, 2)])
def test_decode_routes_bad_files_to_dead_letters(tmp_path, threads, processes):
    good = corpus.every_encoding()["baseline.jpg"]
    (tmp_path / "a.jpg").write_bytes(good)
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"<html></html>")
    sources = [SourceFile(str(tmp_path / n), ("x",)) for n in ("a.jpg", "b.jpg", "c.png")]
    sources.append(SourceFile(str(tmp_path / "missing.jpg"), ("x",)))
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(sources)
            | beam.ParDo(DecodeSourceFn(ImageSpec(16, 16), str(tmp_path / "spill"), None,
                                        threads=threads, processes=processes))
            .with_outputs(ERRORS_TAG, main="images")
        )
        assert_that(out.images | "Uris" >> beam.Map(lambda d: d.uri),
                    equal_to([sources[0].uri]), label="good")
        assert_that(
            out[ERRORS_TAG] | "Reasons" >> beam.Map(lambda e: (e.uri.rsplit("/", 1)[1], e.reason,
                                                                e.stage)),
            equal_to([("b.jpg", "empty_file", "decode"), ("c.png", "not_an_image", "decode"),
                      ("missing.jpg", "unreadable", "read")]),
            label="bad",
        )


def test_threaded_decode_counts_and_outputs_every_file(tmp_path):
    """More files than the in-flight window: some leave from process, the rest from
    finish_bundle; counters are counted on the bundle's thread, so none are lost."""
    images = corpus.every_encoding()
    sources = []
    for index, (name, data) in enumerate(sorted(images.items()) * 3):
        path = tmp_path / f"{index}-{name}"
        path.write_bytes(data)
        sources.append(SourceFile(str(path), ("x",)))
    sources.append(SourceFile(str(tmp_path / "missing.jpg"), ("x",)))
    pipeline = TestPipeline()
    out = (
        pipeline
        | beam.Create(sources)
        | beam.ParDo(DecodeSourceFn(ImageSpec(16, 16), str(tmp_path / "spill"), None, threads=2))
        .with_outputs(ERRORS_TAG, main="images")
    )
    assert_that(out.images | "Uris" >> beam.Map(lambda d: d.uri),
                equal_to([s.uri for s in sources[:-1]]), label="decoded")
    assert_that(out[ERRORS_TAG] | "Errors" >> beam.Map(lambda e: e.reason),
                equal_to(["unreadable"]), label="errors")
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter())["counters"]}
    assert counters == {"images_decoded": len(sources) - 1, "errors_read": 1}


def test_duplicates_merge_into_one_record_with_every_uri_and_label(tmp_path):
    data = corpus.every_encoding()["rgb.png"]
    for name in ("cat/a.png", "cat/b.png", "dog/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    sources = [SourceFile(str(tmp_path / "cat/a.png"), ("cat",)),
               SourceFile(str(tmp_path / "cat/b.png"), ("cat",)),
               SourceFile(str(tmp_path / "dog/c.png"), ("dog",))]
    config = PreprocessConfig(output=str(tmp_path / "out"))
    with TestPipeline() as p:
        merged = (
            p
            | beam.Create(sources)
            | beam.ParDo(DecodeSourceFn(config.image, str(tmp_path / "spill"), None))
            | MergeDuplicates(config)
            | beam.Map(lambda u: (len(u.uris), u.labels, u.label_conflict))
        )
        assert_that(merged, equal_to([(3, ("cat", "dog"), True)]))


def test_plan_shards_balances_and_shuffles_classes():
    config = PreprocessConfig(output="unused", num_shards=4)
    images = [_unique(i, "train", "cat" if i < 50 else "dog") for i in range(100)]
    keys = [(i.split, i.order, i.stored_bytes) for i in images]
    plan = plan_shards(keys, config)
    shards = {}
    for image in images:
        shards.setdefault(plan[(image.split, image.order)], []).append(image)
    assert sorted(shards) == [("train", index, 4) for index in range(4)]
    assert [len(shards[key]) for key in sorted(shards)] == [25, 25, 25, 25]
    for members in shards.values():  # class-sorted input, yet every shard holds both classes
        cats = sum(1 for i in members if i.labels == ("cat",))
        assert 5 <= cats <= 20
    assert plan_shards(list(reversed(keys)), config) == plan  # input order does not matter


def _unique(i, split, label):
    from pipelines.preprocessing.spill import SpillRef
    from pipelines.preprocessing.splits import order_key
    from pipelines.preprocessing.transforms import ImageMeta, UniqueImage

    sha = f"{i:064x}"
    meta = ImageMeta(10, 10, "JPEG", (0.0,) * 3, (0.0,) * 3, stored_sha256="")
    return UniqueImage(sha, (f"/x/{i}",), (label,), False, SpillRef("s", i, 10), 100, meta,
                       split, order_key(sha, "salt"))


def test_a_failed_shard_attempt_leaves_its_temporary_file_under_tmp(tmp_path, monkeypatch):
    """A retried bundle's abandoned attempt: its file waits under _tmp/ (removed before
    the manifest), never beside the shards in data/."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines.preprocessing.spill import SpillWriter
    from pipelines.preprocessing.transforms import WriteShardFn

    writer = SpillWriter(str(tmp_path / "spill"))
    image = dataclasses.replace(_unique(1, "train", "cat"), spill=writer.append(b"jpeg bytes"))
    writer.close()
    out = tmp_path / "out"
    fn = WriteShardFn(str(out), ImageSpec(16, 16), ["cat"])
    fn.setup()
    rename = FileSystems.rename

    def fail_once(sources, destinations):
        monkeypatch.setattr(FileSystems, "rename", rename)
        raise OSError("worker lost")

    monkeypatch.setattr(FileSystems, "rename", fail_once)
    with pytest.raises(OSError):
        list(fn.process((("train", 0, 1), [image])))
    (info,) = fn.process((("train", 0, 1), [image]))  # the retry
    assert sorted(p.name for p in (out / "data").iterdir()) == [info.path.split("/")[1]]
    # Beside the shards (data/) and their record indexes (index/shards/), only the
    # abandoned attempt's files (shard and index), under _tmp/.
    assert {p.relative_to(out).parent.as_posix() for p in out.rglob("*") if p.is_file()
            and p.parent.name != "data"} == {"_tmp/shards", "index/shards"}


_MISSING = OSError(errno.ENOENT, "No such file or directory")
_PERMANENT = [FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "denied"),
              IsADirectoryError(errno.EISDIR, "a folder"), google_errors.NotFound("404"),
              google_errors.Forbidden("403"), BeamIOError("open failed", {"x": _MISSING})]
_TRANSIENT = [OSError(errno.EIO, "Input/output error"), ConnectionResetError(errno.ECONNRESET,
              "reset"), TimeoutError("timed out"), requests.exceptions.ConnectionError("reset"),
              requests.exceptions.ReadTimeout("slow"), google_errors.ServiceUnavailable("503"),
              google_errors.InternalServerError("500"), google_errors.Unauthorized("401"),
              google_errors.RetryError("deadline exceeded", None),
              BeamIOError("open failed", {"x": OSError(errno.EIO, "I/O")})]


@pytest.mark.parametrize("error", _PERMANENT, ids=lambda e: type(e).__name__)
def test_a_file_that_cannot_be_read_for_good_is_a_dead_letter(error, monkeypatch):
    monkeypatch.setattr(transforms, "_read_bytes", _raiser(error))
    outcome = transforms.decode_source(SourceFile("/in/cat/a.jpg", ("cat",)), ImageSpec(8, 8))
    assert (outcome.counter, outcome.error.reason, outcome.error.stage) == (
        "errors_read", "unreadable", "read")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("error", _TRANSIENT, ids=lambda e: type(e).__name__)
def test_any_other_read_error_fails_the_bundle_so_the_runner_retries_it(
        error, threads, monkeypatch, tmp_path):
    """A dead letter is final: a flaky read must never become one."""
    monkeypatch.setattr(transforms, "_read_bytes", _raiser(error))
    fn = DecodeSourceFn(ImageSpec(8, 8), str(tmp_path), None, threads=threads)
    fn.setup()
    fn.start_bundle()
    with pytest.raises(type(error)):
        list(fn.process(SourceFile("/in/cat/a.jpg", ("cat",))))
        list(fn.finish_bundle())
    fn.teardown()


def test_real_local_read_errors_are_told_apart(tmp_path):
    """Not mocked: a dangling link and a folder are dead letters; the kernel's EIO (reading
    /proc/self/mem at offset 0) fails the bundle."""
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "deleted.jpg")
    (tmp_path / "folder.jpg").mkdir()
    for name in ("dangling.jpg", "folder.jpg"):
        outcome = transforms.decode_source(SourceFile(str(tmp_path / name), ("x",)),
                                           ImageSpec(8, 8))
        assert outcome.error.reason == "unreadable", name
    with pytest.raises(OSError) as raised:
        transforms.decode_source(SourceFile("/proc/self/mem", ("x",)), ImageSpec(8, 8))
    assert raised.value.errno == errno.EIO


def _raiser(error):
    def read(uri):
        raise error
    return read


@pytest.mark.parametrize("damaged", [False, True])
def test_reused_bytes_are_verified_and_decoded_again_when_they_do_not_match(tmp_path, damaged):
    import hashlib

    from pipelines.preprocessing.spill import SpillRef
    from pipelines.preprocessing.transforms import UniqueImage, WriteShardFn

    spec = ImageSpec(16, 16)
    source = tmp_path / "cat" / "a.jpg"
    source.parent.mkdir()
    source.write_bytes(corpus.every_encoding()["baseline.jpg"])
    fresh = transforms.decode_source(SourceFile(str(source), ("cat",)), spec)
    assert fresh.meta.stored_sha256 == hashlib.sha256(fresh.image.encoded).hexdigest()
    stored = bytearray(fresh.image.encoded)
    stored[len(stored) // 2] ^= 0xFF if damaged else 0
    earlier = tmp_path / "earlier.tfrecord"
    earlier.write_bytes(b"header" + bytes(stored) + b"trailer")
    image = UniqueImage(
        fresh.sha256, (str(source),), ("cat",), False,
        SpillRef(str(earlier), len(b"header"), len(stored)), fresh.source_bytes,
        fresh.meta, "train", "0", reused=True)
    fn = WriteShardFn(str(tmp_path / "out"), spec, ["cat"])
    fn.setup()
    (info,) = fn.process((("train", 0, 1), [image]))
    assert (info.num_reused, info.num_reuse_mismatch) == ((0, 1) if damaged else (1, 0))
    (row,) = [json.loads(line) for line in info.index_lines.splitlines()]
    written = (tmp_path / "out" / info.path).read_bytes()
    assert written[row["offset"]:row["offset"] + row["length"]] == fresh.image.encoded
    assert row["stored_sha256"] == fresh.meta.stored_sha256

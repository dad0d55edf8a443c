"""The Beam steps of the preprocessing job: thin DoFns around the pure functions.

Shape of the data between steps:
  SourceFile                      (uri, labels) from the listing
  -> DecodeSources  -> DecodedImage | ErrorRow     one per readable / unreadable file
  -> MergeDuplicates -> UniqueImage                one per distinct content (sha256)
  -> WriteShards    -> ShardInfo                   one per written TFRecord file
       (plans from (split, order, bytes) keys, then groups each shard's UniqueImages)
Only small metadata crosses a shuffle; pixels travel through spill files.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from google.api_core import exceptions as google_errors

from pipelines.contract import record_index, records
from pipelines.contract.imaging import ImageSpec, ProcessedImage, process_image
from pipelines.local.progress import WorkerCounter
from pipelines.preprocessing import decode_workers, splits
from pipelines.preprocessing.decode_workers import DecodeFailure, decode_or_failure
from pipelines.preprocessing.options import PreprocessConfig
from pipelines.preprocessing.sources import SourceFile, literal_pattern
from pipelines.preprocessing.spill import SpillRef, SpillWriter, read_spilled

NAMESPACE = "preprocess"
ERRORS_TAG = "errors"


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """What decoding learnt about one content. Every copy of the same bytes has the same
    meta, so it travels unchanged from the decode (or an earlier run's index) to the
    record, the index row and the statistics."""

    original_height: int  # upright, after EXIF orientation
    original_width: int
    source_format: str  # PIL's name: JPEG, PNG, ...
    channel_sums: tuple[float, float, float]  # of the stored (resized) pixels
    channel_squared_sums: tuple[float, float, float]
    # sha256 of the stored (encoded) bytes; for a reused image, what the earlier index
    # promised, checked when the shard writer copies them.
    stored_sha256: str
    # Of the stored pixels (imaging.perceptual_hash); None from an index written before
    # the hash was: such an image takes no part in near-duplicate detection.
    perceptual_hash: int | None = None

    @classmethod
    def of(cls, image: ProcessedImage) -> ImageMeta:
        return cls(original_height=image.original_height, original_width=image.original_width,
                   source_format=image.source_format, channel_sums=image.channel_sums,
                   channel_squared_sums=image.channel_squared_sums,
                   stored_sha256=hashlib.sha256(image.encoded).hexdigest(),
                   perceptual_hash=image.perceptual_hash)

    @classmethod
    def from_index_row(cls, row: dict) -> ImageMeta:
        return cls(original_height=row["original_height"],
                   original_width=row["original_width"], source_format=row["source_format"],
                   channel_sums=tuple(row["channel_sums"]),
                   channel_squared_sums=tuple(row["channel_squared_sums"]),
                   stored_sha256=row["stored_sha256"],
                   perceptual_hash=row.get("perceptual_hash"))

    def index_fields(self) -> dict:
        """The meta as an index row holds it (`from_index_row` reads it back)."""
        # Field by field: `dataclasses.asdict` deep-copies, and this runs once an image.
        return {field.name: getattr(self, field.name) for field in _IMAGE_META_FIELDS} | {
            "channel_sums": list(self.channel_sums),
            "channel_squared_sums": list(self.channel_squared_sums)}


_IMAGE_META_FIELDS = dataclasses.fields(ImageMeta)


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """One source file that decoded; its stored bytes wait in a spill file."""

    sha256: str  # of the source file's bytes
    uri: str
    labels: tuple[str, ...]
    spill: SpillRef
    source_bytes: int
    meta: ImageMeta
    reused: bool = False  # stored bytes taken from an earlier run's shard, not decoded
    earlier_split: str | None = None  # of a reused image: the split it was stored in


@dataclasses.dataclass(frozen=True)
class UniqueImage:
    """One distinct content: every file that had these bytes, merged."""

    sha256: str
    uris: tuple[str, ...]  # sorted
    labels: tuple[str, ...]  # sorted union over the uris
    label_conflict: bool  # the uris disagree on the labels
    spill: SpillRef
    source_bytes: int
    meta: ImageMeta
    split: str
    order: str  # salted hash: the position within the split
    reused: bool = False

    @property
    def stored_bytes(self) -> int:
        return self.spill.length


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    """A dead letter: a file that could not become a record, and why."""

    uri: str
    reason: str
    stage: str
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    split: str
    index: int
    path: str  # relative to the output root
    num_examples: int
    num_bytes: int
    class_counts: dict[str, int]
    num_reused: int = 0
    # Reused images whose bytes in the earlier shard did not match its index (changed,
    # truncated, gone): decoded again from the source instead. Not in num_reused.
    num_reuse_mismatch: int = 0
    # One JSON line (a ReuseEntry-shaped row) per record, in file order: where its image
    # bytes sit in this shard. Text, not dicts: one string crosses to the manifest step
    # instead of a pickle of every row.
    index_lines: str = ""


@dataclasses.dataclass(frozen=True)
class ReuseEntry:
    """An image already stored by an earlier run with the same image config."""

    sha256: str
    spill: SpillRef  # the encoded image inside that run's shard file
    meta: ImageMeta  # its stored_sha256: of those bytes, as that run wrote them
    split: str  # the split that run stored it in

    @classmethod
    def from_index_row(cls, row: dict, root: str) -> ReuseEntry:
        """An index row written by `WriteShardFn` under output `root`."""
        return cls(
            sha256=row["sha256"],
            spill=SpillRef(FileSystems.join(root, *row["path"].split("/")), row["offset"],
                           row["length"]),
            meta=ImageMeta.from_index_row(row),
            split=splits.split_of_shard(row["path"]),
        )


# A file that cannot be read for good is a dead letter: it is not there (deleted since
# the listing, a dangling link, a CSV row naming a folder) or we may not read it (GCS
# 403, local EACCES). Anything else (EIO, a reset connection, a timeout, GCS 500/503
# once the storage client's own retries have run out, a 401) may pass: it fails the
# bundle, so the runner retries it (Dataflow four times) instead of dropping an image.
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
                               errno.ENAMETOOLONG, errno.EACCES, errno.EPERM})


def is_permanent_read_error(err: BaseException) -> bool:
    """Whether reading the same path again can only fail the same way."""
    if isinstance(err, (google_errors.NotFound, google_errors.Forbidden)):
        return True
    if isinstance(err, BeamIOError):  # before OSError: it is one, with no errno
        causes = list((err.exception_details or {}).values())
        return bool(causes) and all(is_permanent_read_error(cause) for cause in causes)
    # requests' ConnectionError and Timeout are OSErrors too, with errno None.
    return isinstance(err, OSError) and err.errno in _PERMANENT_ERRNOS


def _count(name: str, n: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(n)


@dataclasses.dataclass(frozen=True)
class DecodeOutcome:
    """What became of one source file; the DoFn turns it into counters and outputs.

    Exactly one of `error`, `reused` and `image` is set.
    """

    counter: str  # images_decoded | images_reused | errors_<reason>
    error: ErrorRow | None = None
    reused: DecodedImage | None = None
    image: ProcessedImage | None = None
    meta: ImageMeta | None = None  # of image
    sha256: str = ""
    source_bytes: int = 0


def decode_source(source: SourceFile, spec: ImageSpec,
                  reuse: dict[str, ReuseEntry] | None = None,
                  decode: Callable[[bytes, ImageSpec], ProcessedImage | DecodeFailure]
                  = decode_or_failure) -> DecodeOutcome:
    """Reads and decodes one file. Pure apart from the read, and safe in any thread.
    `decode`: `decode_or_failure`, here or in a worker process (`decode_workers`).

    A file that cannot be read for good, or does not decode, is an outcome (a dead
    letter), not an exception; transient read errors raise, so Beam retries the bundle.
    """
    try:
        data = _read_bytes(source.uri)
    except (OSError, google_errors.GoogleAPICallError) as err:
        if not is_permanent_read_error(err):
            raise
        return DecodeOutcome("errors_read", error=ErrorRow(source.uri, "unreadable", "read",
                                                            str(err)[:500]))
    sha256 = hashlib.sha256(data).hexdigest()
    if reuse and sha256 in reuse:
        return DecodeOutcome("images_reused", reused=_reused_image(source, reuse[sha256],
                                                                    len(data)))
    image = decode(data, spec)
    if isinstance(image, DecodeFailure):
        return DecodeOutcome(f"errors_{image.reason}", error=ErrorRow(
            source.uri, image.reason, "decode", image.detail))
    # ImageMeta.of hashes the stored bytes here, in the decode threads.
    return DecodeOutcome("images_decoded", image=image, meta=ImageMeta.of(image), sha256=sha256,
                         source_bytes=len(data))


class DecodeSourceFn(beam.DoFn):
    """SourceFile -> DecodedImage (main output) or ErrorRow (ERRORS_TAG).

    With `threads` > 1 the files of a bundle are read and decoded by a thread pool
    (Pillow releases the GIL while it decodes, resizes and encodes; reads wait on
    storage), a bounded window of them in flight, outputs in input order. With
    `processes`, worker processes decode (`decode_workers`: the local in_memory runner
    runs every step in one thread of one process, which the GIL would otherwise bound)
    and the threads read, hash and wait. Counters, progress and the spill file stay on
    the bundle's thread, where Beam's metrics live.
    """

    def __init__(self, spec: ImageSpec, spill_dir: str, progress_dir: str | None,
                 threads: int = 1, processes: int = 0):
        self._spec = spec
        self._spill_dir = spill_dir
        self._progress_dir = progress_dir
        # With worker processes, two threads per worker: one waits on its worker while
        # the other reads the next file.
        self._threads = max(threads, 2 * processes)
        self._processes = processes
        self._decode = decode_or_failure
        self._spill: SpillWriter | None = None
        self._progress: WorkerCounter | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: deque[Future] = deque()

    def setup(self) -> None:
        if self._progress_dir:
            self._progress = WorkerCounter(self._progress_dir)
        if self._processes:
            self._decode = decode_workers.shared(self._processes).decode
        if self._threads > 1:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def start_bundle(self) -> None:
        self._spill = SpillWriter(self._spill_dir)
        self._in_flight = deque()

    def process(self, source: SourceFile, reuse: dict[str, ReuseEntry] | None = None) -> Iterator:
        """`reuse`: sha256 -> image an earlier run stored with the same image config."""
        if self._pool is None:
            yield from self._outputs(source, decode_source(source, self._spec, reuse,
                                                           self._decode))
            return
        self._in_flight.append(self._pool.submit(
            lambda: (source, decode_source(source, self._spec, reuse, self._decode))))
        # Two per thread keeps every thread busy without holding the bundle in memory.
        while len(self._in_flight) > 2 * self._threads:
            yield from self._outputs(*self._in_flight.popleft().result())

    def finish_bundle(self) -> Iterator:
        while self._in_flight:
            for output in self._outputs(*self._in_flight.popleft().result()):
                yield _in_global_window(output)
        self._spill.close()

    def _outputs(self, source: SourceFile, outcome: DecodeOutcome) -> Iterator:
        _count(outcome.counter)
        if self._progress is not None:
            self._progress.add()
        if outcome.error is not None:
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, outcome.error)
        elif outcome.reused is not None:
            yield outcome.reused
        else:
            image = outcome.image
            yield DecodedImage(
                sha256=outcome.sha256,
                uri=source.uri,
                labels=source.labels,
                spill=self._spill.append(image.encoded),
                source_bytes=outcome.source_bytes,
                meta=outcome.meta,
            )

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._progress is not None:
            self._progress.flush()


def _in_global_window(output: object) -> object:
    """finish_bundle outputs carry their window; everything here is in the global one."""
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, _in_global_window(output.value))
    return WindowedValue(output, MIN_TIMESTAMP, (GlobalWindow(),))


def _reused_image(source: SourceFile, entry: ReuseEntry, source_bytes: int) -> DecodedImage:
    return DecodedImage(
        sha256=entry.sha256,
        uri=source.uri,
        labels=source.labels,
        spill=entry.spill,
        source_bytes=source_bytes,
        meta=entry.meta,
        reused=True,
        earlier_split=entry.split,
    )


def _read_bytes(uri: str) -> bytes:
    with FileSystems.open(uri, compression_type="uncompressed") as handle:
        return handle.read()


def merge_duplicates(
    sha256: str, copies: Iterable[DecodedImage], config: PreprocessConfig
) -> UniqueImage:
    """All files with the same bytes -> one record carrying every uri and label."""
    copies = sorted(copies, key=lambda c: c.uri)
    keep = copies[0]  # the smallest uri: the same pick on every run
    label_sets = {c.labels for c in copies}
    split = splits.assign_split(sha256, config.splits, config.split_salt)
    if config.near_duplicates == "keep_together" and keep.earlier_split in dict(config.splits):
        split = keep.earlier_split  # it may have moved to a near-duplicate's split then
    return UniqueImage(
        sha256=sha256,
        uris=tuple(c.uri for c in copies),
        labels=tuple(sorted({label for c in copies for label in c.labels})),
        label_conflict=len(label_sets) > 1,
        spill=keep.spill,
        source_bytes=keep.source_bytes,
        meta=keep.meta,
        split=split,
        order=splits.order_key(sha256, config.split_salt),
        reused=keep.reused,
    )


class MergeDuplicates(beam.PTransform):
    """DecodedImage -> UniqueImage, one per distinct sha256."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self._config = config

    def expand(self, decoded):
        config = self._config

        def merge(keyed: tuple[str, Iterable[DecodedImage]]) -> UniqueImage:
            unique = merge_duplicates(keyed[0], keyed[1], config)
            _count("duplicates", len(unique.uris) - 1)
            _count("label_conflicts", int(unique.label_conflict))
            return unique

        return (
            decoded
            | "KeyBySha256" >> beam.Map(lambda d: (d.sha256, d))
            # (sha256, [DecodedImage])
            | "GroupCopies" >> beam.GroupByKey()
            | "Merge" >> beam.Map(merge)
        )


ShardKey = tuple[str, int, int]  # (split, shard index, shard count)


def plan_shards(keys: Iterable[tuple[str, str, int]], config: PreprocessConfig
                ) -> dict[tuple[str, str], ShardKey]:
    """(split, order, stored bytes) of every unique image -> {(split, order): its shard}.

    Balanced and shuffled within each split: the images, sorted by `order` (a salted
    hash), are dealt round robin, and each shard is written in `order`.
    """
    keys = list(keys)
    assignment = {}
    for split, _ in config.splits:
        members = sorted((order, size) for member_split, order, size in keys
                         if member_split == split)
        count = splits.shard_count(
            split,
            len(members),
            sum(size for _, size in members),
            config.splits,
            config.num_shards,
            config.shard_size_mb,
        )
        for index, shard in enumerate(splits.deal_round_robin(members, count)):
            for order, _ in shard:
                assignment[(split, order)] = (split, index, count)
    return assignment


class WriteShardFn(beam.DoFn):
    """(ShardKey, [UniqueImage]) -> one TFRecord file, its records in `order`, written
    under a temporary name, then renamed."""

    def __init__(self, output: str, spec: ImageSpec, labels: Sequence[str]):
        self._output = output
        self._spec = spec
        self._labels = tuple(labels)

    def setup(self) -> None:
        self._label_ids = {label: index for index, label in enumerate(self._labels)}

    def process(self, keyed: tuple[ShardKey, Iterable[UniqueImage]]) -> Iterator[ShardInfo]:
        (split, index, count), members = keyed
        images = sorted(members, key=lambda image: image.order)
        name = splits.shard_name(split, index, count)
        relative = f"data/{name}"
        final_path = FileSystems.join(self._output, relative)
        # Under _tmp/ (removed before the manifest is written): a retried bundle's
        # abandoned attempt never leaves a stray file beside the shards in data/.
        temporary = FileSystems.join(self._output, "_tmp", "shards",
                                     f"{name}.{uuid.uuid4().hex}")
        blobs = read_spilled(image.spill for image in images if not image.reused)
        earlier = _read_earlier(image.spill for image in images if image.reused)
        class_counts: Counter[str] = Counter()
        num_bytes = mismatches = 0
        index_lines, framed_lengths = [], []
        with FileSystems.create(temporary) as handle:
            for image in images:
                if not image.reused:
                    encoded = blobs[image.spill]
                elif _intact(earlier.get(image.spill), image):
                    encoded = earlier[image.spill]
                else:
                    image, encoded = self._decode_again(image)
                    mismatches += 1
                record, image_offset = self._example(image, encoded)
                _TFRecordUtil.write_record(handle, record)
                index_lines.append(_index_line(
                    image, relative, num_bytes + record_index.HEADER_BYTES + image_offset,
                    len(encoded)))
                framed_lengths.append(_TFRecordUtil.encoded_num_bytes(record))
                num_bytes += framed_lengths[-1]
                class_counts.update(image.labels)
        self._write_record_index(relative, name, framed_lengths)
        _make_folder(FileSystems.join(self._output, "data"))
        FileSystems.rename([temporary], [final_path])
        _count("records_written", len(images))
        _count("reuse_mismatches", mismatches)
        yield ShardInfo(split, index, relative, len(images), num_bytes,
                        dict(sorted(class_counts.items())),
                        num_reused=sum(image.reused for image in images) - mismatches,
                        num_reuse_mismatch=mismatches,
                        index_lines="".join(index_lines))

    def _write_record_index(self, relative: str, name: str, lengths: list[int]) -> None:
        """The shard's `.idx` (pipelines.contract.record_index), in place before the
        shard itself: a shard in data/ always has its index."""
        index = FileSystems.join(self._output, *record_index.index_path(relative).split("/"))
        temporary = FileSystems.join(self._output, "_tmp", "shards",
                                     f"{name}.idx.{uuid.uuid4().hex}")
        with FileSystems.create(temporary) as handle:
            handle.write(record_index.format_index(lengths).encode())
        _make_folder(FileSystems.join(self._output, *record_index.INDEX_FOLDER.split("/")))
        FileSystems.rename([temporary], [index])

    def _decode_again(self, image: UniqueImage) -> tuple[UniqueImage, bytes]:
        """A reused image whose earlier bytes did not verify, made from its source as a
        run without --reuse_from would have. The decode step read that source and found
        the hash the record carries; a read or decode failure now (it changed or went
        away since) fails the bundle: its record cannot be written, nor dropped this late.
        """
        uri = image.uris[0]  # the copy merge_duplicates kept
        data = _read_bytes(uri)
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise RuntimeError(f"{uri} changed while the job ran; rerun the job")
        try:
            processed = process_image(data, self._spec)
        except Exception as err:
            raise RuntimeError(f"{uri}: the --reuse_from output stored it, but it no "
                               f"longer decodes here: {err}") from err
        return dataclasses.replace(image, reused=False,
                                   meta=ImageMeta.of(processed)), processed.encoded

    def _example(self, image: UniqueImage, encoded: bytes) -> tuple[bytes, int]:
        return records.make_example_locating_image(
            encoded=encoded,
            image_format=self._spec.image_format.value,
            height=self._spec.height,
            width=self._spec.width,
            label_ids=[self._label_ids[label] for label in image.labels],
            labels=image.labels,
            source_uris=image.uris,
            sha256=image.sha256,
            original_height=image.meta.original_height,
            original_width=image.meta.original_width,
        )


def _read_earlier(refs: Iterable[SpillRef]) -> dict[SpillRef, bytes]:
    """Reused images' bytes from the earlier output's shards, read like spill files. A
    shard that is gone or unreadable for good leaves its refs out; one shorter than the
    index says gives short bytes (local files and GCS alike): both are decoded again.
    Other errors raise, as reads do."""
    by_path: dict[str, list[SpillRef]] = {}
    for ref in refs:
        by_path.setdefault(ref.path, []).append(ref)
    blobs = {}
    for path_refs in by_path.values():
        try:
            blobs.update(read_spilled(path_refs))
        except (OSError, google_errors.GoogleAPICallError) as err:
            if not is_permanent_read_error(err):
                raise
    return blobs


def _intact(encoded: bytes | None, image: UniqueImage) -> bool:
    """Whether bytes read back from an earlier shard are the ones its index describes."""
    return (encoded is not None and len(encoded) == image.spill.length
            and hashlib.sha256(encoded).hexdigest() == image.meta.stored_sha256)


def _make_folder(path: str) -> None:
    """A local rename needs its target folder; object stores have none (a no-op)."""
    try:
        FileSystems.mkdirs(path)
    except OSError:  # it exists already (another shard made it); a real failure fails
        pass  # the rename that follows, with its own message


def _index_line(image: UniqueImage, shard_path: str, offset: int, length: int) -> str:
    """Where this run stored `image` (a JSON line), for `ReuseEntry.from_index_row` in a
    later run."""
    # stored_sha256 is of the `length` bytes at `offset`.
    return json.dumps({"sha256": image.sha256, "path": shard_path, "offset": offset,
                       "length": length, **image.meta.index_fields()}, sort_keys=True) + "\n"


def _reuse_entry(row: dict, root: str) -> Iterator[tuple[str, ReuseEntry]]:
    """(sha256, entry) for an index row that can be verified. Rows written before the
    index held `stored_sha256` cannot: their images are decoded again (once: the new
    output's index has the hashes), as a length alone would not notice a changed byte."""
    if "stored_sha256" not in row:
        _count("reuse_index_rows_unverifiable")
        return
    yield row["sha256"], ReuseEntry.from_index_row(row, root)


class ReadReuseIndex(beam.PTransform):
    """(sha256, ReuseEntry) for every image stored by the earlier output at `root`."""

    def __init__(self, root: str, index_path: str):
        super().__init__()
        self._root = root
        self._index_path = index_path

    def expand(self, pipeline):
        root = self._root
        index = FileSystems.join(root, *self._index_path.split("/"))
        return (
            pipeline
            # ReadFromText takes a pattern: `[` in --reuse_from must not match `1`.
            | "ReadIndex" >> beam.io.ReadFromText(literal_pattern(index))
            | "ParseIndex" >> beam.Map(json.loads)
            | "ToEntries" >> beam.FlatMap(_reuse_entry, root)
        )


class WriteShards(beam.PTransform):
    """UniqueImage -> ShardInfo: plan all shards at once, write them in parallel.

    Planning needs every image of a split at once, but only three small fields of each:
    those go through one ToList as tuples (which Beam encodes natively), and each image
    then finds its shard in the plan and travels through a single GroupByKey. Collecting
    and reshuffling the whole UniqueImages instead cost three pickling round trips of
    every image's metadata.
    """

    def __init__(self, config: PreprocessConfig, labels: Sequence[str]):
        super().__init__()
        self._config = config
        self._labels = labels

    def expand(self, unique_images):
        config = self._config
        plan = (
            unique_images
            | "PlanKeys" >> beam.Map(lambda image: (image.split, image.order,
                                                    image.stored_bytes))
            | "CollectKeys" >> beam.combiners.ToList()
            # {(split, order): (split, shard index, shard count)}
            | "Plan" >> beam.Map(lambda keys: plan_shards(keys, config))
        )
        return (
            unique_images
            | "AssignShards" >> beam.Map(
                lambda image, plan: (plan[(image.split, image.order)], image),
                plan=beam.pvalue.AsSingleton(plan))
            # (ShardKey, [UniqueImage]): one shard per key, written in parallel
            | "GroupByShard" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShardFn(config.output, config.image, self._labels))
        )

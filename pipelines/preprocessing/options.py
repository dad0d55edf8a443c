"""Command-line options of the preprocessing job, parsed into a frozen config.

Our flags go to `PreprocessConfig`; every other flag must be a Beam pipeline
option and goes to `PipelineOptions` untouched. Mistakes end in a one-line
message (`UsageError`), not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from pipelines.contract.command import prog
from pipelines.contract.errors import UsageError
from pipelines.contract.imaging import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_PIXELS,
    ImageFormat,
    ImageSpec,
    ResizeMode,
)
from pipelines.preprocessing.near_duplicates import DEFAULT_THRESHOLD as NEAR_DUPLICATE_THRESHOLD

_DIRECT_RUNNERS = ("DirectRunner", "direct")  # the names Beam's DirectRunner answers to
DEFAULT_SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
# TFRecord guidance: files of 100 MB+ read efficiently; TFDS keeps 64 MiB-1 GiB.
DEFAULT_SHARD_SIZE_MB = 128
DEFAULT_SPLIT_SALT = "imagebeam-split-v1"
# A few corrupt files never stop a job (about 1% of a real corpus is normal); a run that
# is mostly dead letters (wrong folder, wrong format, credentials) fails instead.
DEFAULT_MAX_ERROR_RATE = 0.1


NEAR_DUPLICATE_MODES = ("report", "keep_together")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Everything the pipeline needs to know, fixed before it is built."""

    output: str
    input: str | None = None
    labels_csv: str | None = None
    image: ImageSpec = ImageSpec(224, 224)
    splits: tuple[tuple[str, float], ...] = DEFAULT_SPLITS
    num_shards: int | None = None  # train shards; None = sized by shard_size_mb
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
    split_salt: str = DEFAULT_SPLIT_SALT
    overwrite: bool = False
    progress: bool = True
    baseline_stats: str | None = None  # an earlier run's stats/statistics.pb: drift
    reuse_from: str | None = None  # an earlier output whose stored images may be reused
    # per decoding DoFn; 0 = auto (decode_threads(), decode_processes()); not output
    decode_threads: int = 0
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # dead letters / image files, at most
    run_id: str | None = None  # the output claim's id (pipelines.contract.ownership); not output
    # report: list near-duplicate pairs; keep_together: also put a new image in the split
    # of a near-duplicate that has one.
    near_duplicates: str = "report"
    # Hamming distance of the 64-bit perceptual hashes
    near_duplicate_threshold: int = NEAR_DUPLICATE_THRESHOLD

    def to_json(self) -> dict:
        """The config as it is recorded in the manifest."""
        image = dataclasses.asdict(self.image)
        image["resize"] = self.image.resize.value
        image["image_format"] = self.image.image_format.value
        return {
            "input": self.input,
            "labels_csv": self.labels_csv,
            "image": image,
            "splits": dict(self.splits),
            "num_shards": self.num_shards,
            "shard_size_mb": self.shard_size_mb,
            "split_salt": self.split_salt,
            "baseline_stats": self.baseline_stats,
            "reuse_from": self.reuse_from,
            "max_error_rate": self.max_error_rate,
            "near_duplicates": self.near_duplicates,
            "near_duplicate_threshold": self.near_duplicate_threshold,
        }


def parse_image_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '224,160' -> (height 224, width 160)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--image_size wants N or HEIGHT,WIDTH (positive integers), got {text!r}")
    height = int(parts[0])
    width = int(parts[-1])
    if max(height, width) > 4096:
        raise UsageError(f"--image_size {text} is over 4096 pixels a side")
    return height, width


def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
    """'train=0.8,validation=0.1,test=0.1' -> ordered (name, fraction) pairs summing to 1."""
    splits = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or not name.isidentifier() or not 0 < fraction <= 1:
            raise UsageError(
                f"--splits wants name=fraction,... with fractions in (0, 1], got {item!r}"
            )
        splits.append((name, fraction))
    names = [name for name, _ in splits]
    if len(set(names)) != len(names):
        raise UsageError(f"--splits names a split twice: {text!r}")
    if abs(sum(f for _, f in splits) - 1.0) > 1e-6:
        raise UsageError(f"--splits fractions must sum to 1, got {sum(f for _, f in splits):g}")
    return tuple(splits)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pipelines.preprocess"),
        description="Raw images (local folder or gs:// prefix, one folder per class, or a "
        "uri,label CSV) -> deduplicated, split, shuffled TFRecord shards + manifest.json. "
        "Flags not listed here are passed to Beam (e.g. --runner DataflowRunner).",
    )
    parser.add_argument("--input", help="folder or gs:// prefix laid out as <label>/<file>")
    parser.add_argument("--labels", dest="labels_csv", help="CSV of uri,label rows "
                        "(uris absolute or relative to the CSV; several rows = several labels)")
    parser.add_argument("--output", required=True, help="output folder or gs:// prefix")
    parser.add_argument("--image_size", default="224", help="N or HEIGHT,WIDTH (default 224)")
    parser.add_argument("--resize", choices=[m.value for m in ResizeMode], default="squash",
                        help="squash (default: keeps everything, as Keras' loader), crop, pad")
    parser.add_argument("--splits", default="train=0.8,validation=0.1,test=0.1")
    parser.add_argument("--num_shards", type=int, help="train shards (others scaled, >= 1)")
    parser.add_argument("--shard_size_mb", type=float, default=DEFAULT_SHARD_SIZE_MB,
                        help=f"target shard size when --num_shards is not set "
                        f"(default {DEFAULT_SHARD_SIZE_MB})")
    parser.add_argument("--image_format", choices=[f.value for f in ImageFormat], default="jpeg",
                        help="what the shards store (default jpeg: 4:2:0; the exported model "
                        "repeats the encoding, so serving sees the stored pixels)")
    parser.add_argument("--jpeg_quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help=f"quality of stored JPEGs (default {DEFAULT_JPEG_QUALITY})")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images declaring more pixels (decompression bombs)")
    parser.add_argument("--split_salt", default=DEFAULT_SPLIT_SALT,
                        help="salt of the content hash that picks splits; change it to reshuffle")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete earlier output at --output")
    parser.add_argument("--max_error_rate", type=float, default=DEFAULT_MAX_ERROR_RATE,
                        help="largest fraction of image files that may become dead letters; "
                        "above it the run fails and writes no manifest.json "
                        f"(default {DEFAULT_MAX_ERROR_RATE:g}; 0 = any dead letter fails)")
    parser.add_argument("--near_duplicates", choices=NEAR_DUPLICATE_MODES, default="report",
                        help="report (default): list pairs of distinct images that look the "
                        "same in stats/near_duplicates.jsonl and the report; keep_together: "
                        "also put a new image into the split of a near-duplicate already "
                        "assigned one (images that have a split never move)")
    parser.add_argument("--near_duplicate_threshold", type=int,
                        default=NEAR_DUPLICATE_THRESHOLD,
                        help="largest Hamming distance of two images' 64-bit perceptual "
                        "hashes that makes them near-duplicates "
                        f"(default {NEAR_DUPLICATE_THRESHOLD})")
    parser.add_argument("--no_progress", dest="progress", action="store_false")
    parser.add_argument("--reuse_from", metavar="URI",
                        help="an earlier output: images it stored with the same image config "
                        "are copied from its shards instead of decoded again")
    parser.add_argument("--decode_threads", type=int, default=0,
                        help="threads reading and decoding files in each decoding step, in "
                        "this process (default 0 = auto: on the local in_memory runner, "
                        "threads read and a worker process per core decodes; 1 where the "
                        "runner already runs a worker per core)")
    parser.add_argument("--baseline_stats", metavar="URI",
                        help="an earlier run's stats/statistics.pb (or its output folder): "
                        "report drift against it "
                        "(stats/anomalies.json and the report)")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[PreprocessConfig, PipelineOptions]:
    """Splits argv into our config and Beam's options. Raises UsageError."""
    parser = _parser()
    known, beam_args = parser.parse_known_args(list(argv))
    _reject_unknown_beam_flags(beam_args)
    refuse_glob_characters("--output", known.output)
    if not known.input and not known.labels_csv:
        raise UsageError("give --input (a folder or gs:// prefix) or --labels (a CSV)")
    if known.num_shards is not None and known.num_shards < 1:
        raise UsageError("--num_shards must be at least 1")
    if known.shard_size_mb <= 0:
        raise UsageError("--shard_size_mb must be positive")
    if known.decode_threads < 0:
        raise UsageError("--decode_threads must be 0 (auto) or more")
    if not 0 <= known.max_error_rate <= 1:
        raise UsageError("--max_error_rate must be in 0..1")
    if not 0 <= known.near_duplicate_threshold <= 32:
        raise UsageError("--near_duplicate_threshold must be in 0..32")
    if not 1 <= known.jpeg_quality <= 100:
        raise UsageError("--jpeg_quality must be in 1..100")
    height, width = parse_image_size(known.image_size)
    config = PreprocessConfig(
        output=known.output.rstrip("/"),
        input=known.input.rstrip("/") if known.input else None,
        labels_csv=known.labels_csv,
        image=ImageSpec(
            height=height,
            width=width,
            resize=ResizeMode(known.resize),
            image_format=ImageFormat(known.image_format),
            jpeg_quality=known.jpeg_quality,
            max_pixels=known.max_pixels,
        ),
        splits=parse_splits(known.splits),
        num_shards=known.num_shards,
        shard_size_mb=known.shard_size_mb,
        split_salt=known.split_salt,
        overwrite=known.overwrite,
        progress=known.progress,
        baseline_stats=known.baseline_stats,
        reuse_from=known.reuse_from.rstrip("/") if known.reuse_from else None,
        decode_threads=known.decode_threads,
        max_error_rate=known.max_error_rate,
        near_duplicates=known.near_duplicates,
        near_duplicate_threshold=known.near_duplicate_threshold,
    )
    return config, beam_options(beam_args)


GLOB_CHARACTERS = "[*?"


def refuse_glob_characters(flag: str, path: str) -> None:
    """Raises UsageError for an output path holding `[`, `*` or `?`: Beam's matching and
    TensorFlow's file loading (the statistics phase reads its SavedModel back) would take
    them for patterns, and an output we may delete must never be a pattern."""
    found = sorted({c for c in path if c in GLOB_CHARACTERS})
    if found:
        raise UsageError(f"{flag} {path} contains {' '.join(found)}: output paths may not "
                         "hold [, * or ? (they would be read as patterns); rename it")


def beam_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam options with our local default: the DirectRunner, one worker thread."""
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = "DirectRunner"
    if standard.runner in (*_DIRECT_RUNNERS, "PrismRunner") and not _has_flag(
        beam_args, "--direct_running_mode"
    ):
        # in_memory: bundles run one at a time in this process. As fast as
        # `multi_threading` here and lighter, and safe: threaded runs over large inputs
        # flooded the runner's in-memory GroupByKey buffers until the OOM killer struck;
        # multi_processing imports TensorFlow again in every worker. The decode step's
        # thread pool (decode_threads) is what uses every core. Measurements:
        # docs/performance.md and docs/design.md. `--direct_running_mode
        # multi_threading` still works; use Dataflow for data that needs more machines.
        direct = options.view_as(DirectOptions)
        direct.direct_running_mode = "in_memory"
    return options


def local_runner(options: PipelineOptions):
    """Beam's in-process FnApiRunner where the options name the DirectRunner, else None
    (Beam builds the runner the options name).

    Why not let Beam choose: its DirectRunner (2.77) first tries the Prism runner, a Go
    binary it downloads from GitHub on first use. Offline that fails and it falls back to
    this same FnApiRunner, after converting the whole pipeline to its portable form once
    more for Prism (a fixed cost every run); online it runs on Prism, which ignores
    `--direct_running_mode` and is not what the numbers in the README were measured on.
    `--runner PrismRunner` still picks Prism.
    """
    if options.view_as(StandardOptions).runner not in _DIRECT_RUNNERS:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # What the DirectRunner's own fallback passes: the options, for the SDK worker.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def decode_threads(config: PreprocessConfig, options: PipelineOptions) -> int:
    """Threads per decoding DoFn: the user's choice, else every core where bundles run
    one at a time in one process (the local in_memory default), else 1: Dataflow and
    the threaded/multi-process local modes already run a bundle per core."""
    if config.decode_threads:
        return config.decode_threads
    return (os.cpu_count() or 1) if runs_in_this_process(options) else 1


def decode_processes(config: PreprocessConfig, options: PipelineOptions) -> int:
    """Worker processes that decode beside the pipeline's (`decode_workers`): one per core
    where bundles run one at a time in this process and there is more than one core,
    unless --decode_threads asked for threads; else 0 (decode in the step's threads)."""
    cores = os.cpu_count() or 1
    if config.decode_threads or cores < 2 or not runs_in_this_process(options):
        return 0
    return cores


def runs_in_this_process(options: PipelineOptions) -> bool:
    """Whether the pipeline's steps run in this process, one bundle at a time: the
    DirectRunner names (`local_runner`) in `--direct_running_mode in_memory`."""
    return (options.view_as(StandardOptions).runner in _DIRECT_RUNNERS
            and options.view_as(DirectOptions).direct_running_mode == "in_memory")


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _reject_unknown_beam_flags(beam_args: Sequence[str]) -> None:
    """Beam only warns about flags it does not know; a typo must not pass silently."""
    parser = argparse.ArgumentParser(add_help=False)
    for cls in _all_subclasses(PipelineOptions):
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            continue  # two option classes declaring one flag
    _, unknown = parser.parse_known_args(list(beam_args))
    flags = [a for a in unknown if a.startswith("-")]
    if flags or unknown:
        raise UsageError(f"unknown option(s): {' '.join(unknown)} (see --help)")


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found

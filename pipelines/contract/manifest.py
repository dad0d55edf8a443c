"""What a complete preprocess output is: `manifest.json` and the paths it names.

An output is complete if and only if it has a `manifest.json`, written last by the run
that claimed the folder (`pipelines.preprocessing.output` writes it; `ownership` says
what in the folder is ours). Everything that reads an output (the trainer, the report,
retraining, reuse) reads it through `read_manifest`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

from pipelines.contract import ownership

FORMAT_VERSION = 1
MANIFEST = ownership.MANIFEST
IN_PROGRESS = ownership.CLAIM  # our claim on the folder, written first, removed last
# The top-level entries a run writes: its claim lists them, and so does its manifest.
OUTPUT_ENTRIES = ("data", "errors", "index", "stats", "transform_output", "_tmp",
                  "manifest.json.tmp", "dataset_info.json", "features.json",
                  "image.class.label.labels.txt")  # the last three: tfds_metadata.FILES
ERRORS_PATH = "errors/errors.jsonl"
INDEX_PATH = "index/images.jsonl"  # where each image's bytes sit in the shards (for reuse)


def join(root: str, relative: str) -> str:
    return FileSystems.join(root, *relative.split("/"))


class ManifestError(ValueError):
    """A `manifest.json` that is not one this code can read (another tool's, or another
    format version, or keys missing)."""


def read_manifest(root: str) -> Manifest:
    """The manifest of a complete output, validated (our format version and keys).

    Raises FileNotFoundError if there is none, ManifestError if it is not ours to read."""
    path = join(root, MANIFEST)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{path} not found: not a complete preprocess output")
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        data = handle.read()
    try:
        return Manifest.from_json(json.loads(data))
    except ValueError as err:  # ManifestError is one, and so is a JSON syntax error
        raise ManifestError(f"{path} is not a manifest this version can read: {err}") from err


# ---------------------------------------------------------------- the typed manifest


@dataclass(frozen=True)
class ImageSpec:
    """The stored image: every record of the output has this size and encoding."""

    height: int
    width: int
    channels: int
    format: str  # "jpeg" | "png"
    resize: str  # the resize mode preprocess used

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the output root
    num_examples: int
    num_bytes: int


@dataclass(frozen=True)
class SplitEntry:
    num_examples: int
    class_counts: dict[str, int]
    shards: tuple[ShardEntry, ...]


@dataclass(frozen=True)
class Accounting:
    """Where every input file went: files_seen = images_written + duplicates + errors +
    skipped (checked when the manifest is built)."""

    files_seen: int
    images_written: int
    duplicates: int
    label_conflicts: int
    errors: int
    skipped: int
    hidden_ignored: int
    reused: int = 0  # of images_written: bytes taken from --reuse_from, not decoded again
    reuse_mismatches: int = 0  # reuse candidates whose bytes failed sha256/length

    @property
    def image_files(self) -> int:
        """Files that had an image name: the denominator of the error budget."""
        return self.files_seen - self.skipped


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: what a complete output holds. Built by preprocessing's output step,
    read by everything else through `read_manifest`; `to_json` is the file's content."""

    input: str | None
    config: dict
    image: ImageSpec
    labels: tuple[str, ...]
    splits: dict[str, SplitEntry]
    accounting: Accounting
    skipped: tuple[dict, ...] = ()
    errors_path: str = ERRORS_PATH
    index_path: str = INDEX_PATH
    entries: tuple[str, ...] = OUTPUT_ENTRIES
    # Written by the statistics phase; None when preprocess ran with --no_statistics.
    statistics: str | None = None
    anomalies: str | None = None
    report: str | None = None
    transform_output: str | None = None
    # {path, threshold, pairs, across_splits, across_labels}
    near_duplicates: dict | None = None
    timings: dict | None = None
    format_version: int = FORMAT_VERSION

    def shard_paths(self, split: str) -> list[str]:
        """The split's shard paths relative to the root, in index order; [] if absent."""
        entry = self.splits.get(split)
        return [shard.path for shard in entry.shards] if entry else []

    def to_json(self) -> dict:
        """The manifest.json object, keys in the order the file has always had."""
        value = {
            "format_version": self.format_version,
            "input": self.input,
            "config": self.config,
            "image": dataclasses.asdict(self.image),
            "labels": list(self.labels),
            "splits": {
                name: {"num_examples": entry.num_examples,
                       "class_counts": dict(entry.class_counts),
                       "shards": [dataclasses.asdict(shard) for shard in entry.shards]}
                for name, entry in self.splits.items()
            },
            "accounting": dataclasses.asdict(self.accounting),
            "skipped": [dict(row) for row in self.skipped],
            "errors_path": self.errors_path,
            "index_path": self.index_path,
            "entries": list(self.entries),
        }
        for key in _STATISTICS_KEYS:
            if getattr(self, key) is not None:
                value[key] = getattr(self, key)
        return value

    @classmethod
    def from_json(cls, value: object) -> Manifest:
        """Validates a parsed manifest.json; raises ManifestError naming what is wrong."""
        if not isinstance(value, dict):
            raise ManifestError("not a JSON object")
        if value.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"format_version {value.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; preprocess again with this version")
        missing = [key for key in REQUIRED_KEYS if key not in value]
        if missing:
            raise ManifestError(f"keys missing: {', '.join(missing)}")
        try:
            return cls(
                input=value.get("input"),
                config=dict(value["config"]),
                image=ImageSpec(**value["image"]),
                labels=tuple(str(label) for label in value["labels"]),
                splits={str(name): _split_entry(entry)
                        for name, entry in dict(value["splits"]).items()},
                accounting=Accounting(**value["accounting"]),
                skipped=tuple(dict(row) for row in value.get("skipped", ())),
                errors_path=str(value["errors_path"]),
                index_path=str(value["index_path"]),
                entries=tuple(value.get("entries") or _EARLIER_ENTRIES),
                **{key: value.get(key) for key in _STATISTICS_KEYS},
            )
        except (TypeError, ValueError, AttributeError, KeyError) as err:
            raise ManifestError(f"malformed: {err}") from err


REQUIRED_KEYS = ownership.MANIFEST_KEYS
_STATISTICS_KEYS = ("statistics", "anomalies", "report", "transform_output", "near_duplicates",
                    "timings")
# Manifests written before the entries were listed own just these.
_EARLIER_ENTRIES = ("data", "errors", "index", "stats", "transform_output", "_tmp")


def _split_entry(entry: dict) -> SplitEntry:
    return SplitEntry(
        num_examples=int(entry["num_examples"]),
        class_counts={str(k): int(v) for k, v in dict(entry.get("class_counts", {})).items()},
        shards=tuple(ShardEntry(path=str(s["path"]), num_examples=int(s["num_examples"]),
                                num_bytes=int(s["num_bytes"])) for s in entry["shards"]),
    )

"""Finding the input files and their labels: class-per-folder layout or a uri,label CSV.

Listing runs once in the launcher, through Beam's FileSystems (local paths and
gs://, which honours STORAGE_EMULATOR_HOST), so a missing or empty input fails
before any worker starts and the progress bar knows its total.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
from collections import defaultdict

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from pipelines.imaging import IMAGE_EXTENSIONS


class InputError(ValueError):
    """The input cannot be listed or read; the message says why, for a person."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file and the labels its location (or the CSV) gives it."""

    uri: str
    labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    uri: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Listing:
    """Every file under the input, sorted into what will be read and what will not."""

    sources: tuple[SourceFile, ...]
    skipped: tuple[SkippedFile, ...]
    hidden: int  # dot-files and dot-folders (.DS_Store, .ipynb_checkpoints): ignored

    @property
    def files_seen(self) -> int:
        return len(self.sources) + len(self.skipped)


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_class_folders(root: str) -> Listing:
    """Lists `root/<label>/**` (local path or gs:// prefix)."""
    root = root.rstrip("/")
    sources, skipped, hidden = [], [], 0
    for path in _match_all(root):
        relative = path[len(root) :].lstrip("/")
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts):
            hidden += 1
        elif len(parts) < 2:
            skipped.append(SkippedFile(path, "not_in_a_class_folder"))
        elif not is_image_name(path):
            skipped.append(SkippedFile(path, "not_an_image_name"))
        else:
            sources.append(SourceFile(path, (parts[0],)))
    return _finish(root, sources, skipped, hidden)


def list_labels_csv(csv_uri: str) -> Listing:
    """Reads `uri,label` rows; several rows for one uri give it several labels."""
    text = _read_text(csv_uri)
    base = posixpath.dirname(csv_uri)
    labels_by_uri: dict[str, list[str]] = defaultdict(list)
    skipped = []
    for line_number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (line_number == 1 and [c.strip().lower() for c in row] == ["uri", "label"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            skipped.append(SkippedFile(f"{csv_uri}#L{line_number}", "malformed_csv_row"))
            continue
        uri = _resolve(base, row[0].strip())
        label = row[1].strip()
        if label not in labels_by_uri[uri]:
            labels_by_uri[uri].append(label)
    sources = []
    for uri, labels in labels_by_uri.items():
        if posixpath.basename(uri).startswith("."):
            skipped.append(SkippedFile(uri, "hidden_file"))
        elif not is_image_name(uri):
            skipped.append(SkippedFile(uri, "not_an_image_name"))
        else:
            sources.append(SourceFile(uri, tuple(sorted(labels))))
    return _finish(csv_uri, sources, skipped, 0)


def _finish(where: str, sources: list, skipped: list, hidden: int) -> Listing:
    if not sources and not skipped:
        raise InputError(f"no files found under {where}")
    if not sources:
        raise InputError(f"no image files under {where} ({len(skipped)} other files)")
    return Listing(
        tuple(sorted(sources, key=lambda s: s.uri)),
        tuple(sorted(skipped, key=lambda s: s.uri)),
        hidden,
    )


def _resolve(base: str, uri: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.normpath(posixpath.join(base, uri)) if "://" not in base else (
        base.rstrip("/") + "/" + posixpath.normpath(uri)
    )


def _match_all(root: str) -> list[str]:
    try:
        results = FileSystems.match([root + "/**"])
    except BeamIOError as err:
        raise InputError(f"cannot list {root}: {_first_cause(err)}") from err
    except Exception as err:  # noqa: BLE001 - storage clients raise many kinds; all mean "cannot list"
        raise InputError(f"cannot list {root}: {err}") from err
    return sorted(m.path for m in results[0].metadata_list)


def _read_text(uri: str) -> str:
    try:
        with FileSystems.open(uri) as handle:
            return handle.read().decode("utf-8-sig")
    except (BeamIOError, OSError) as err:
        raise InputError(f"cannot read {uri}: {_first_cause(err)}") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{uri} is not UTF-8 text: {err}") from err


def _first_cause(err: BaseException) -> str:
    causes = getattr(err, "exception_details", None)
    if isinstance(causes, dict) and causes:
        return str(next(iter(causes.values())))
    return str(err)

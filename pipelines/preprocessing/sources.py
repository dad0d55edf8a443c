"""Finding the input files and their labels: class-per-folder layout or a uri,label CSV.

Listing runs once in the launcher (os.walk for local paths; Beam's FileSystems for
gs://, which honours STORAGE_EMULATOR_HOST), so a missing or empty input fails
before any worker starts and the progress bar knows its total.

Paths are literal: `[`, `*` and `?` in a folder or file name are characters, never
patterns (`literal_pattern` escapes them wherever Beam would match).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import posixpath
import re
import unicodedata
import warnings
from collections import defaultdict

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from pipelines.contract.imaging import IMAGE_EXTENSIONS


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

    def counts(self) -> ListingCounts:
        """What the manifest's accounting needs, without the sources: steps that run
        after decoding carry this, not a pickled copy of every listed file."""
        return ListingCounts(self.files_seen, self.skipped, self.hidden)


@dataclasses.dataclass(frozen=True)
class ListingCounts:
    """A Listing's totals (read like a Listing by the manifest and the statistics)."""

    files_seen: int
    skipped: tuple[SkippedFile, ...]
    hidden: int


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
        elif problem := label_problem(parts[0]):
            skipped.append(SkippedFile(path, problem))
        else:
            sources.append(SourceFile(path, (clean_label(parts[0]),)))
    return _finish(root, sources, skipped, hidden)


# A labels CSV is untrusted input naming files the job reads with the job's own
# credentials, and labels every later file format must hold (tf.Transform's vocabulary
# file is one label a line). So: every uri must lie under one allowed root, and a row
# that breaks a rule is a skipped entry `<csv>#L<line>` with a reason code; it is never
# read, and it is counted in the manifest's `files_seen` and `skipped`.
MAX_LABEL_CHARS = 128
MAX_URI_CHARS = 1024  # GCS's own limit on object names
# Controls (\n, \t, NUL, ...), format characters (zero-width, bidi overrides) and line or
# paragraph separators: invisible or line-breaking in every file we write labels to.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")  # "gs:", "file:", "http:", "c:" ...


class _Rejected(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def clean_label(text: str) -> str:
    """The label as stored: stripped and NFC-normalised, so the same word typed on two
    systems (macOS writes decomposed accents) is one class, not two."""
    return unicodedata.normalize("NFC", text.strip())


def label_problem(text: str) -> str | None:
    """Reason code if `text` cannot be a label (empty, too long, control characters)."""
    label = clean_label(text)
    if not label:
        return "malformed_csv_row"
    if len(label) > MAX_LABEL_CHARS:
        return "label_too_long"
    if _has_forbidden_characters(label):
        return "label_control_characters"
    return None


def _has_forbidden_characters(text: str) -> bool:
    return any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in text)


def list_labels_csv(csv_uri: str, allowed_root: str | None = None) -> Listing:
    """Reads `uri,label` rows; several rows for one uri give it several labels.

    Relative uris resolve against the CSV's folder. Every uri must lie under
    `allowed_root` (default: the CSV's own folder or gs:// prefix); other schemes
    (file://, http://), other buckets and `..` escapes are skipped rows, never read.
    """
    text = _read_text(csv_uri)
    base = posixpath.dirname(csv_uri)
    root = (allowed_root or base).rstrip("/") or "."
    labels_by_uri: dict[str, list[str]] = defaultdict(list)
    skipped = []
    for line_number, row in _csv_rows(text):
        if line_number == 1 and row and [c.strip().lower() for c in row] == ["uri", "label"]:
            continue
        try:
            if row is None or len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise _Rejected("malformed_csv_row")
            uri = resolve_uri(base, row[0].strip(), root)
            if problem := label_problem(row[1]):
                raise _Rejected(problem)
        except _Rejected as rejected:
            skipped.append(SkippedFile(f"{csv_uri}#L{line_number}", rejected.reason))
            continue
        label = clean_label(row[1])
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


def _csv_rows(text: str):
    """(line number, fields or None if unparseable) per physical line.

    Each line is parsed on its own: a stray quote would otherwise swallow every later
    line into one field, and one bad row must never cost more than itself.
    """
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield line_number, next(csv.reader([line], strict=True))
        except csv.Error:  # unbalanced quotes, a field over csv.field_size_limit()
            yield line_number, None


def resolve_uri(base: str, uri: str, root: str) -> str:
    """`uri` from a CSV in folder `base`, made absolute and checked to lie under `root`.

    Raises _Rejected with a reason code. The check is lexical (object stores have no
    symlinks; a local root is trusted not to contain links that lead out of it).
    """
    if len(uri) > MAX_URI_CHARS:
        raise _Rejected("uri_too_long")
    if _has_forbidden_characters(uri):
        raise _Rejected("uri_control_characters")
    scheme = _SCHEME.match(uri)
    if scheme and (scheme.group(1) != "gs" or not uri.startswith("gs://")):
        raise _Rejected("uri_scheme_not_allowed")
    if scheme or uri.startswith("/"):
        resolved = _normalize(uri)
    else:
        resolved = _normalize(base.rstrip("/") + "/" + uri if base else uri)
    if not _is_under(resolved, root):
        raise _Rejected("uri_outside_root")
    return resolved


def _normalize(uri: str) -> str:
    """Collapses `.` and `..`; a gs:// path that climbs out of its bucket is rejected."""
    if not uri.startswith("gs://"):
        return posixpath.normpath(uri)
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    name = posixpath.normpath(name) if name else ""
    if not bucket or name == ".." or name.startswith("../") or name.startswith("/"):
        raise _Rejected("uri_outside_root")
    return f"gs://{bucket}/{name}"


def _is_under(uri: str, root: str) -> bool:
    if root.startswith("gs://") != uri.startswith("gs://"):
        return False  # a local path in a gs:// CSV, or the other way round
    if not uri.startswith("gs://"):
        uri, root = os.path.abspath(uri), os.path.abspath(root)
    return uri == root or uri.startswith(root.rstrip("/") + "/")


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


def _match_all(root: str) -> list[str]:
    """Every file under `root`, sorted; `root` is taken literally."""
    if "://" not in root:
        return _walk(root)
    try:
        # Beam lists by the text before the first escaped character, then keeps what the
        # pattern matches: only the root's own files. (Python warns that the regex of an
        # escaped `[`, `[[]`, may one day mean a nested set; Beam 2.77 compiles it so.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Possible nested set", FutureWarning)
            results = FileSystems.match([literal_pattern(root) + "/**"])
    except BeamIOError as err:
        raise InputError(f"cannot list {root}: {_first_cause(err)}") from err
    except Exception as err:  # noqa: BLE001 - storage clients raise many kinds; all mean "cannot list"
        raise InputError(f"cannot list {root}: {err}") from err
    return sorted(m.path for m in results[0].metadata_list)


def _walk(root: str) -> list[str]:
    """Local files under `root` (links to files included, links to folders not
    followed). Not FileSystems.match: Beam would list from the parent of the first
    glob character, the whole tree above a root like `photos [2024]`; and it drops
    entries it cannot stat (a dangling link), which here become dead letters instead."""

    def fail(err: OSError) -> None:
        if err.filename != root:  # a missing root is an empty listing: "no files found"
            raise InputError(f"cannot list {err.filename}: {err.strerror}") from err

    return sorted(os.path.join(folder, name)
                  for folder, _, names in os.walk(root, onerror=fail) for name in names)


_GLOB_CHARACTERS = re.compile(r"([\[*?])")


def literal_pattern(path: str) -> str:
    """`path` as a FileSystems.match pattern that matches only itself: `[`, `*` and `?`
    in brackets (Beam's patterns, fnmatch-like, have no other escape)."""
    return _GLOB_CHARACTERS.sub(r"[\1]", path)


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

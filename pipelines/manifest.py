"""The output folder's life: claimed at start, `manifest.json` written last.

An output is complete if and only if it has a `manifest.json`. A run deletes
an earlier manifest before touching anything else, and writes its own only
after every shard and side file is in place, so a killed run never leaves a
folder that looks complete.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

from apache_beam.io.filesystems import FileSystems

from pipelines.options import PreprocessConfig, UsageError
from pipelines.sources import ListingCounts

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IN_PROGRESS = "_IN_PROGRESS"  # our claim on a folder; lets a rerun clean a killed run
OWNED_ENTRIES = ("data", "errors", "index", "stats", "transform_output", "_tmp", IN_PROGRESS,
                 "manifest.json.tmp")
ERRORS_PATH = "errors/errors.jsonl"
INDEX_PATH = "index/images.jsonl"  # where each image's bytes sit in the shards (for reuse)


def join(root: str, relative: str) -> str:
    return FileSystems.join(root, *relative.split("/"))


def prepare_output(config: PreprocessConfig) -> None:
    """Claims `config.output`, or raises UsageError saying why it cannot."""
    root = config.output
    entries = _entries(root)
    if MANIFEST in entries and not config.overwrite:
        raise UsageError(f"{root} already holds a complete output; pass --overwrite to replace it")
    foreign = sorted(entries - set(OWNED_ENTRIES) - {MANIFEST})
    if foreign and IN_PROGRESS not in entries and MANIFEST not in entries:
        raise UsageError(f"{root} is not empty and not an earlier output of this tool "
                         f"({', '.join(foreign[:3])}...); choose an empty folder")
    if MANIFEST in entries:
        remove_tree(join(root, MANIFEST))  # first: the old output stops being complete
    for name in OWNED_ENTRIES:
        if name in entries:
            remove_tree(join(root, name))
    _write_text(join(root, IN_PROGRESS), "preprocessing in progress; manifest.json comes last\n")


def _entries(root: str) -> set[str]:
    """Top-level names under `root` (files and folders); empty if it does not exist."""
    try:  # a missing local folder or bucket prefix matches nothing, without an error
        matches = FileSystems.match([root.rstrip("/") + "/**"])[0].metadata_list
    except Exception as err:  # noqa: BLE001 - storage clients raise many kinds
        # Not "empty": guessing so on flaky storage would skip the overwrite check.
        raise UsageError(f"cannot list the output {root}: {err}") from err
    prefix = root.rstrip("/") + "/"
    return {m.path[len(prefix):].split("/", 1)[0] for m in matches if m.path.startswith(prefix)}


def remove_tree(path: str) -> None:
    """Deletes a file or everything under a folder/prefix, local or gs://."""
    if "://" not in path:
        if FileSystems.exists(path):
            FileSystems.delete([path])  # files, or folders recursively
        return
    found = [m.path for m in FileSystems.match([path + "/**"])[0].metadata_list]
    if FileSystems.exists(path):
        found.append(path)
    if found:
        FileSystems.delete(found)


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(text.encode())


def build_manifest(
    config: PreprocessConfig,
    listing: ListingCounts,
    labels: Sequence[str],
    shards: Sequence,
    errors: Sequence,
    duplicates: int,
    label_conflicts: int,
    extra: dict | None = None,
) -> dict:
    """The manifest as a dict; checks that every input file is accounted for."""
    split_names = [name for name, _ in config.splits]
    split_entries = {}
    for name in split_names:
        members = sorted((s for s in shards if s.split == name), key=lambda s: s.index)
        class_counts: Counter[str] = Counter({label: 0 for label in labels})
        for shard in members:
            class_counts.update(shard.class_counts)
        split_entries[name] = {
            "num_examples": sum(s.num_examples for s in members),
            "class_counts": dict(class_counts),
            "shards": [
                {"path": s.path, "num_examples": s.num_examples, "num_bytes": s.num_bytes}
                for s in members
            ],
        }
    written = sum(entry["num_examples"] for entry in split_entries.values())
    accounting = {
        "files_seen": listing.files_seen,
        "images_written": written,
        "duplicates": duplicates,
        "label_conflicts": label_conflicts,
        "errors": len(errors),
        "skipped": len(listing.skipped),
        "hidden_ignored": listing.hidden,
        # Of images_written: bytes taken from the --reuse_from output instead of decoded.
        "reused": sum(getattr(s, "num_reused", 0) for s in shards),
    }
    accounted = written + duplicates + len(errors) + len(listing.skipped)
    if accounted != listing.files_seen:
        raise RuntimeError(f"accounting mismatch: {listing.files_seen} files seen, "
                           f"{accounted} accounted for ({accounting})")
    image = config.image
    manifest = {
        "format_version": FORMAT_VERSION,
        "input": config.input or config.labels_csv,
        "config": config.to_json(),
        "image": {
            "height": image.height,
            "width": image.width,
            "channels": 3,
            "format": image.image_format.value,
            "resize": image.resize.value,
        },
        "labels": list(labels),
        "splits": split_entries,
        "accounting": accounting,
        "skipped": [{"uri": s.uri, "reason": s.reason} for s in listing.skipped],
        "errors_path": ERRORS_PATH,
        "index_path": INDEX_PATH,
    }
    manifest.update(extra or {})
    return manifest


def write_outputs(
    config: PreprocessConfig, manifest: dict, errors: Sequence, shards: Sequence = ()
) -> None:
    """Writes the dead letters and the image index, then the manifest (last)."""
    root = config.output
    lines = sorted(error.to_json() for error in errors)
    _write_text(join(root, ERRORS_PATH), "".join(line + "\n" for line in lines))
    # Each shard's lines are in file order: sorted by (path, offset) overall.
    _write_text(join(root, INDEX_PATH),
                "".join(shard.index_lines for shard in sorted(shards, key=lambda s: s.path)))
    remove_tree(join(root, "_tmp"))
    temporary = join(root, MANIFEST + ".tmp")
    _write_text(temporary, json.dumps(manifest, indent=2) + "\n")
    FileSystems.rename([temporary], [join(root, MANIFEST)])
    # The claim goes after the manifest: a leftover claim beside a manifest is harmless.
    remove_tree(join(root, IN_PROGRESS))


def read_manifest(root: str) -> dict:
    """The manifest of a complete output; raises FileNotFoundError if there is none."""
    path = join(root, MANIFEST)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{path} not found: not a complete preprocess output")
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return json.loads(handle.read())

"""What a complete preprocess output is: `manifest.json` and the paths it names.

An output is complete if and only if it has a `manifest.json`, written last by the run
that claimed the folder (`pipelines.preprocessing.output` writes it; `ownership` says
what in the folder is ours). Everything that reads an output (the trainer, the report,
retraining, reuse) reads it through `read_manifest`.
"""

from __future__ import annotations

import json

from apache_beam.io.filesystems import FileSystems

from pipelines.contract import ownership

FORMAT_VERSION = 1
MANIFEST = ownership.MANIFEST
IN_PROGRESS = ownership.CLAIM  # our claim on the folder, written first, removed last
# The top-level entries a run writes: its claim lists them, and so does its manifest.
OUTPUT_ENTRIES = ("data", "errors", "index", "stats", "transform_output", "_tmp",
                  "manifest.json.tmp")
ERRORS_PATH = "errors/errors.jsonl"
INDEX_PATH = "index/images.jsonl"  # where each image's bytes sit in the shards (for reuse)


def join(root: str, relative: str) -> str:
    return FileSystems.join(root, *relative.split("/"))


class ManifestError(ValueError):
    """A `manifest.json` that is not one this code can read (another tool's, or another
    format version, or keys missing)."""


def read_manifest(root: str) -> dict:
    """The manifest of a complete output, validated (our format version and keys).

    Raises FileNotFoundError if there is none, ManifestError if it is not ours to read."""
    path = join(root, MANIFEST)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{path} not found: not a complete preprocess output")
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        data = handle.read()
    manifest = ownership.tool_manifest(data, FORMAT_VERSION)
    if manifest is None:
        raise ManifestError(f"{path} is not a manifest this version can read: {_why(data)}")
    return manifest


def _why(data: bytes) -> str:
    try:
        found = json.loads(data)
    except ValueError as err:
        return f"not JSON ({err})"
    if not isinstance(found, dict):
        return "not a JSON object"
    if found.get("format_version") != FORMAT_VERSION:
        return (f"format_version {found.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; preprocess again with this version")
    missing = [key for key in ownership.MANIFEST_KEYS if key not in found]
    return f"keys missing: {', '.join(missing) or 'none'}; splits must be an object"

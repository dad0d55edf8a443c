"""Reading JSON files, and replacing them whole: local paths or gs:// (Beam's FileSystems)."""

from __future__ import annotations

import json
import os
import time

from apache_beam.io.filesystems import FileSystems


def read_json(path: str) -> dict:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return json.loads(handle.read())


def write_json_atomically(path: str, value: dict, temporary: str | None = None,
                          sort_keys: bool = False) -> None:
    """Writes `value` beside `path` (at `temporary`, default a unique name), then renames
    it over `path`: a reader (or a kill) sees the old file or the new one, never half of
    one."""
    text = json.dumps(value, indent=2, sort_keys=sort_keys) + "\n"
    temporary = temporary or f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    if "://" in path:
        with FileSystems.create(temporary) as handle:
            handle.write(text.encode())
        # GCS: a copy then a delete; the copy replaces the object in one step.
        FileSystems.rename([temporary], [path])
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())  # the data is on disk before the name points at it
    os.replace(temporary, path)

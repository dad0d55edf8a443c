"""The predict output folder: claimed first, summary.json written last.

    <output>/predictions/predictions-SSSSS-of-NNNNN.jsonl   one row per predicted file
    <output>/errors/errors.jsonl                            dead letters
    <output>/summary.json                                   the completion marker

The safety rules are preprocess's (`pipelines.contract.ownership`): the folder must be
empty or provably ours, one run writes it at a time, and `--overwrite` removes only
entries a summary or claim of ours lists. Our completion marker is summary.json, which
`ownership.claim_output` does not know (it knows manifest.json), so a folder holding a
summary is checked here and claimed with `ownership.acquire`.
"""

from __future__ import annotations

import json
import os
import socket
import time

from apache_beam.io.filesystems import FileSystems

from pipelines.contract import ownership
from pipelines.contract.jsonio import write_json_atomically
from pipelines.contract.manifest import join
from pipelines.prediction.summary import FORMAT_VERSION, is_ours

SUMMARY = "summary.json"
PREDICTIONS_PREFIX = "predictions/predictions"
ERRORS_PATH = "errors/errors.jsonl"
ENTRIES = ("predictions", "errors", "_tmp", SUMMARY + ".tmp")


def claim_output(root: str, overwrite: bool, run_id: str,
                 lease_s: float = ownership.LEASE_S) -> ownership.OutputClaim:
    """Claims `root` for a predict run, removing what an earlier run of ours left there;
    raises OutputRefused (a UsageError), having touched nothing, when the folder is not
    provably ours, is complete without `overwrite`, or a live run holds it."""
    present = ownership.list_entries(root)
    if ownership.MANIFEST in present:
        raise ownership.OutputRefused(f"{root} holds a manifest.json (a preprocess output?), "
                                      "not predictions; choose another folder")
    if SUMMARY not in present:
        return ownership.claim_output(root, ENTRIES, overwrite, FORMAT_VERSION,
                                      run_id=run_id, lease_s=lease_s)
    summary = _read_json(join(root, SUMMARY))
    if not is_ours(summary):
        raise ownership.OutputRefused(f"{join(root, SUMMARY)} is not this tool's prediction "
                                      "summary; nothing was touched")
    if not overwrite:
        raise ownership.OutputRefused(f"{root} already holds complete predictions; pass "
                                      "--overwrite to replace them")
    owned = {SUMMARY, ownership.CLAIM, *summary["entries"]}
    if ownership.CLAIM in present:
        claim = ownership.ClaimRecord.parse(_read_bytes(ownership.claim_path(root)))
        if claim is None:
            raise ownership.OutputRefused(f"{ownership.claim_path(root)} is not this tool's "
                                          "claim file; nothing was touched")
        owned.update(claim.entries)
    foreign = present - owned
    if foreign:
        raise ownership.OutputRefused(f"{root} holds entries this tool did not write "
                                      f"({', '.join(sorted(foreign))}); move them away")
    record = ownership.ClaimRecord(run_id=run_id, entries=tuple(sorted(ENTRIES)),
                                   created_at=time.time(), host=socket.gethostname(),
                                   pid=os.getpid())
    held = ownership.acquire(ownership.claim_path(root), record, lease_s)
    try:
        # The summary first: from here on the folder no longer looks complete.
        for name in [SUMMARY, *sorted((owned - {SUMMARY, ownership.CLAIM}) & present)]:
            ownership.remove_tree(join(root, name))
    except BaseException:
        held.release()
        raise
    return held


def finish(root: str, run_id: str, summary: dict) -> None:
    """Writes summary.json (last), while the claim still names `run_id`, then removes
    the claim. Raises ownership.ClaimLost if another run took the output over."""
    ownership.remove_tree(join(root, "_tmp"))
    ownership.check_still_ours(root, run_id)
    write_json_atomically(join(root, SUMMARY), {**summary, "entries": list(ENTRIES)},
                          temporary=join(root, SUMMARY + ".tmp"))
    ownership.remove_tree(ownership.claim_path(root))


def _read_bytes(path: str) -> bytes:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            return handle.read()
    except Exception as err:  # noqa: BLE001 - unreadable: not provably ours
        raise ownership.OutputRefused(f"cannot read {path} ({err}); nothing was touched") from err


def _read_json(path: str) -> object:
    try:
        return json.loads(_read_bytes(path))
    except ValueError:
        return None


def open_summary(root: str):
    """summary.json of a complete output, opened for reading (bytes)."""
    return FileSystems.open(join(root, SUMMARY), compression_type="uncompressed")

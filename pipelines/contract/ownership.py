"""What in an output folder is ours, and one writer at a time.

A folder is ours only by proof, never by the names in it:

- our claim, `_IN_PROGRESS`: JSON naming this tool, the format version, the run id and
  the top-level entries the run may write. A run creates it exclusively, before it writes
  or deletes anything, and removes it after `manifest.json`;
- or a `manifest.json` that validates as ours (`tool_manifest`): our format version and
  keys, and the entries it lists.

Anything else in the folder, file or folder, makes the run refuse, touching nothing.
`--overwrite` replaces an output that is provably ours, and removes only the entries its
manifest or claim lists.

One writer per output. A claim is live while its run holds it:

- local folders: the run holds an exclusive `flock` on the claim file for as long as it
  runs; the kernel drops it when the process dies, however it dies. A claim nobody holds
  is stale and is taken over (locked, then rewritten).
- gs:// prefixes: the claim object is created with `ifGenerationMatch=0` and carries a
  lease (`expires_at`) that the live run renews, each time with `ifGenerationMatch` of
  its own last write. A claim past its lease is stale, and is taken over with
  `ifGenerationMatch` of the stale generation, so of two runs taking over one wins.
  A launch that does not wait for its job (a classic template, a Flex launch) cannot
  renew, so its lease is long (`UNFOLLOWED_LEASE_S`); the job itself releases the claim.

Before `manifest.json` is written, finalization checks that the claim still names its
run (`check_still_ours`), so a run whose claim was taken over never publishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

from apache_beam.io.filesystems import FileSystems

from pipelines.contract.errors import UsageError

TOOL = "imagebeam"
CLAIM = "_IN_PROGRESS"
MANIFEST = "manifest.json"
CLAIM_FORMAT_VERSION = 1
LEASE_S = 600.0  # a followed run renews its gs:// lease every third of this
UNFOLLOWED_LEASE_S = 7 * 24 * 3600.0
# Keys every manifest of ours has, whatever its format version's extras.
MANIFEST_KEYS = ("format_version", "config", "image", "labels", "splits", "accounting",
                 "errors_path", "index_path")


class OutputRefused(UsageError):
    """The output is not ours, is being written by a live run, or overlaps an input."""


class ClaimLost(RuntimeError):
    """Our claim on the output was taken over (or removed) by another run."""


@dataclasses.dataclass(frozen=True)
class ClaimRecord:
    """The content of a claim file: who claims the folder and what it may write there."""

    run_id: str
    entries: tuple[str, ...]
    created_at: float
    expires_at: float | None = None  # gs:// leases only
    host: str = ""
    pid: int = 0

    def to_bytes(self) -> bytes:
        body = {"tool": TOOL, "format_version": CLAIM_FORMAT_VERSION,
                **dataclasses.asdict(self), "entries": list(self.entries)}
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> ClaimRecord | None:
        """The record, or None when `data` is not a claim of ours."""
        try:
            body = json.loads(data)
            if body.get("tool") != TOOL or body.get("format_version") != CLAIM_FORMAT_VERSION:
                return None
            return cls(run_id=str(body["run_id"]), entries=tuple(body["entries"]),
                       created_at=float(body["created_at"]),
                       expires_at=(None if body.get("expires_at") is None
                                   else float(body["expires_at"])),
                       host=str(body.get("host", "")), pid=int(body.get("pid", 0)))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def tool_manifest(data: bytes, format_version: int) -> dict | None:
    """The manifest if `data` is one of ours (our format version and keys), else None."""
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    if (not isinstance(manifest, dict) or manifest.get("format_version") != format_version
            or any(key not in manifest for key in MANIFEST_KEYS)
            or not isinstance(manifest.get("splits"), dict)):
        return None
    return manifest


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- overlapping paths


def path_parts(path: str) -> tuple[str, ...]:
    """A path as comparable parts: local paths resolved (`..`, relative, symlinks),
    gs:// prefixes split on '/' (so `gs://b/run` and `gs://b/run2` do not overlap)."""
    if path.startswith("gs://"):
        bucket, _, key = path[len("gs://"):].partition("/")
        return ("gs://", bucket, *[part for part in key.split("/") if part])
    if "://" in path:
        scheme, _, rest = path.partition("://")
        return (scheme + "://", *[part for part in rest.split("/") if part])
    return PurePosixPath(os.path.realpath(path)).parts


def overlaps(a: str, b: str) -> bool:
    """Whether `a` equals, contains or sits inside `b`."""
    parts_a, parts_b = path_parts(a), path_parts(b)
    common = min(len(parts_a), len(parts_b))
    return parts_a[:common] == parts_b[:common]


def refuse_overlaps(output: str, others: Mapping[str, str | None]) -> None:
    """Raises OutputRefused when `output` equals, contains or sits inside any of
    `others` ({flag: path}); checked before anything is read or deleted."""
    for flag, path in others.items():
        if path and overlaps(output, path):
            raise OutputRefused(f"--output {output} overlaps {flag} {path}: the output may not "
                                "equal, contain or sit inside it; choose a separate folder")


# ---------------------------------------------------------------- the claim


class OutputClaim:
    """A held claim (the file at `path`). `release()` (or the `with` block's end) gives up the lock
    or stops renewing the lease; the claim file itself is removed by the run's last step,
    after its manifest."""

    def __init__(self, path: str, record: ClaimRecord, lock_fd: int | None = None,
                 generation: int | None = None, lease_s: float = LEASE_S):
        self.path = path
        self.record = record
        self._lock_fd = lock_fd
        self._generation = generation
        self._lease_s = lease_s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None  # why, once a renewal found the claim taken over
        if generation is not None and lease_s < UNFOLLOWED_LEASE_S:
            self._renewer = threading.Thread(target=self._renew_lease, daemon=True,
                                             name=f"lease-{record.run_id}")
            self._renewer.start()

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def _renew_lease(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            record = dataclasses.replace(self.record, expires_at=time.time() + self._lease_s)
            try:
                self._generation = gcs_write(self.path, record.to_bytes(),
                                              if_generation_match=self._generation)
                self.record = record
            except PreconditionFailed:
                self.lost = f"{self.path} was taken over by another run"
                return
            except Exception:  # noqa: BLE001 - transient: the next renewal tries again
                continue

    def release(self, remove: bool = False) -> None:
        """Stops holding the claim; `remove` also deletes the claim file, while it is
        still ours (a lock that outlives its holder, such as a retraining tick's)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if remove:
            self._remove_while_ours()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def _remove_while_ours(self) -> None:
        if self._lock_fd is not None:  # local: we hold the flock, so it is ours
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        elif self._generation is not None and self.lost is None:
            from google.api_core import exceptions

            bucket, name = split_gcs(self.path)
            with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
                gcs_client().bucket(bucket).blob(name).delete(
                    if_generation_match=self._generation)

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_path(root: str) -> str:
    return FileSystems.join(root, CLAIM)


def claim_output(root: str, entries: Iterable[str], overwrite: bool, format_version: int,
                 run_id: str | None = None, lease_s: float = LEASE_S) -> OutputClaim:
    """Claims `root` for a run that writes the top-level `entries`, removing what an
    earlier run of ours left there (a killed run's entries, or with `overwrite` a
    complete output); raises OutputRefused, having touched nothing, when the folder holds
    anything not provably ours, a complete output without `overwrite`, or a live claim."""
    present = list_entries(root)
    manifest = _read_ours(root, MANIFEST, present,
                          lambda data: tool_manifest(data, format_version), "manifest.json")
    claim = _read_ours(root, CLAIM, present, ClaimRecord.parse, "claim file")
    if manifest is not None and not overwrite:
        raise OutputRefused(f"{root} already holds a complete output; pass --overwrite to "
                            "replace it")
    if manifest is None and claim is None and present:
        raise OutputRefused(f"{root} is not empty and not an output of this tool "
                            f"({_names(present)}); choose an empty or new folder")
    owned = {CLAIM, MANIFEST, *(claim.entries if claim else ()),
             *(manifest_entries(manifest) if manifest else ())}
    foreign = present - owned
    if foreign:
        raise OutputRefused(f"{root} holds entries this tool did not write "
                            f"({_names(foreign)}); move them away or choose another folder")
    record = ClaimRecord(run_id=run_id or new_run_id(), entries=tuple(sorted(set(entries))),
                         created_at=time.time(), host=socket.gethostname(), pid=os.getpid())
    held = acquire(claim_path(root), record, lease_s)
    try:
        # The old manifest first: from here on the folder no longer looks complete.
        for name in [MANIFEST, *sorted((owned - {CLAIM, MANIFEST}) & present)]:
            if name in present:
                remove_tree(FileSystems.join(root, name))
    except BaseException:
        held.release()
        raise
    return held


def check_still_ours(root: str, run_id: str) -> None:
    """Raises ClaimLost unless the claim on `root` names `run_id` (finalization calls it
    right before writing the manifest)."""
    path = claim_path(root)
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            record = ClaimRecord.parse(handle.read())
    except Exception as err:  # noqa: BLE001 - missing, or storage errors: not provably ours
        raise ClaimLost(f"{path} is gone ({err}); another run took the output over") from err
    if record is None or record.run_id != run_id:
        other = record.run_id if record else "not ours"
        raise ClaimLost(f"{root} was claimed by another run ({other}) while run {run_id} "
                        "was writing; its manifest is not written")


def manifest_entries(manifest: Mapping) -> tuple[str, ...]:
    """The top-level entries a manifest of ours owns: those it lists, else (earlier
    manifests) the ones every output of ours has."""
    listed = manifest.get("entries")
    if isinstance(listed, list) and all(isinstance(name, str) for name in listed):
        return tuple(listed)
    return ("data", "errors", "index", "stats", "transform_output", "_tmp")


def list_entries(root: str) -> set[str]:
    """Top-level names under `root` (files and folders); empty if it does not exist."""
    if "://" not in root:
        if not os.path.exists(root):
            return set()
        if not os.path.isdir(root):
            raise OutputRefused(f"--output {root} is a file, not a folder")
        return set(os.listdir(root))
    try:  # a missing prefix lists nothing, without an error
        bucket, prefix = split_gcs(root)
        start = prefix + "/" if prefix else ""
        blobs = gcs_client().list_blobs(bucket, prefix=start)
        return {blob.name[len(start):].split("/", 1)[0] for blob in blobs}
    except OutputRefused:
        raise
    except Exception as err:  # noqa: BLE001 - storage clients raise many kinds
        # Not "empty": guessing so on flaky storage would skip every check.
        raise OutputRefused(f"cannot list the output {root}: {err}") from err


def remove_tree(path: str) -> None:
    """Deletes a file, or everything under a folder/prefix, local or gs://. The path is
    listed literally (no glob patterns): a name with `[`, `*` or `?` is just a name."""
    if "://" not in path:
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil

            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    bucket, prefix = split_gcs(path)
    client = gcs_client()
    blobs = list(client.list_blobs(bucket, prefix=prefix + "/")) if prefix else []
    exact = client.bucket(bucket).get_blob(prefix)
    if exact is not None:
        blobs.append(exact)
    for blob in blobs:
        try:
            blob.delete()
        except Exception as err:  # noqa: BLE001 - gone already is what we want
            if getattr(err, "code", None) != 404:
                raise


def _read_ours(root: str, name: str, present: set[str], parse, what: str):
    if name not in present:
        return None
    path = FileSystems.join(root, name)
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            data = handle.read()
    except Exception as err:  # noqa: BLE001 - a folder of that name, or unreadable
        raise OutputRefused(f"{path} is not this tool's {what} ({err}); nothing was "
                            "touched") from err
    parsed = parse(data)
    if parsed is None:
        raise OutputRefused(f"{path} is not this tool's {what}; {root} is not an output of "
                            "this tool, nothing was touched")
    return parsed


def _names(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")


# ---------------------------------------------------------------- local: flock


def acquire(path: str, record: ClaimRecord, lease_s: float = LEASE_S) -> OutputClaim:
    """Creates or takes over (if stale) the claim file at `path` for `record`'s run;
    raises OutputRefused while a live run holds it. The claim's folder is `dirname(path)`."""
    if "://" in path:
        return _claim_gcs(path, record, lease_s)
    return _claim_local(path, record)


def _claim_local(path: str, record: ClaimRecord) -> OutputClaim:
    root = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = _lock_existing(path)
            if fd is None:
                continue  # it vanished (its run finished) between two looks: look again
        else:
            if not _try_lock(fd):  # another run found our fresh file first and holds it
                os.close(fd)
                raise _live(root, _read_local(path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.to_bytes(), 0)
        os.fsync(fd)
        return OutputClaim(path, record, lock_fd=fd)


def _lock_existing(path: str) -> int | None:
    """A locked fd on the existing claim file at `path` (stale: nobody held it), None if
    it disappeared; raises OutputRefused when a live run holds it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    if not _try_lock(fd):
        os.close(fd)
        raise _live(os.path.dirname(path), _read_local(path))
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:  # its run removed it after its manifest and let go: not a stale claim
        os.close(fd)
        return None
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_local(path: str) -> ClaimRecord | None:
    try:
        with open(path, "rb") as handle:
            return ClaimRecord.parse(handle.read())
    except OSError:
        return None


def _live(root: str, record: ClaimRecord | None) -> OutputRefused:
    who = (f"run {record.run_id} (pid {record.pid} on {record.host})" if record
           else "another run")
    return OutputRefused(f"{root} is in use by {who}; wait for it to finish or "
                         "choose another folder")


# ---------------------------------------------------------------- gs://: generations + lease


class PreconditionFailed(Exception):
    pass


def _claim_gcs(path: str, record: ClaimRecord, lease_s: float) -> OutputClaim:
    root = path.rsplit("/", 1)[0]
    record = dataclasses.replace(record, expires_at=time.time() + lease_s)
    expected = 0  # "create only if absent"
    bucket, name = split_gcs(path)
    blob = gcs_client().bucket(bucket).get_blob(name)
    if blob is not None:
        current = ClaimRecord.parse(blob.download_as_bytes())
        if current is not None and (current.expires_at or 0) > time.time():
            raise _live(root, current)
        expected = blob.generation
    try:
        generation = gcs_write(path, record.to_bytes(), if_generation_match=expected)
    except PreconditionFailed as err:
        raise OutputRefused(f"{root} was claimed by another run a moment ago; wait for it "
                            "to finish or choose another folder") from err
    return OutputClaim(path, record, generation=generation, lease_s=lease_s)


def gcs_write(path: str, data: bytes, if_generation_match: int | None) -> int:
    from google.api_core import exceptions

    bucket, name = split_gcs(path)
    blob = gcs_client().bucket(bucket).blob(name)
    try:
        blob.upload_from_string(data, content_type="application/json",
                                if_generation_match=if_generation_match)
    except exceptions.PreconditionFailed as err:
        raise PreconditionFailed(str(err)) from err
    return blob.generation


_CLIENTS: dict = {}


def gcs_client():
    """One client per endpoint (tests point STORAGE_EMULATOR_HOST at new emulators)."""
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
    if endpoint not in _CLIENTS:
        from google.cloud import storage

        _CLIENTS[endpoint] = storage.Client()
    return _CLIENTS[endpoint]


def split_gcs(path: str) -> tuple[str, str]:
    if not path.startswith("gs://"):
        raise OutputRefused(f"{path}: only local folders and gs:// prefixes are supported")
    bucket, _, name = path[len("gs://"):].partition("/")
    return bucket, name.rstrip("/")

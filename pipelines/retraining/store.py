"""Where a retraining root keeps things, and the two ways a tick changes it.

Layout under ROOT (local folder or gs://): current.json (the serving model), runs/<run_id>/
data/, model/ and retrain.json. `input_fingerprint` says whether anything is new;
`swap_current` replaces current.json as a compare-and-swap.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from pipelines.contract import manifest as manifest_lib
from pipelines.contract import ownership
from pipelines.contract.jsonio import read_json, write_json_atomically
from pipelines.preprocessing.sources import InputError, list_labels_csv

if TYPE_CHECKING:
    from pipelines.retraining.options import RetrainConfig

CURRENT = "current.json"
RECORD = "retrain.json"
RUNS, DATA, MODEL = "runs", "data", "model"
TICK_CLAIM = "_TICK_IN_PROGRESS"  # one tick per root (pipelines.contract.ownership: flock / lease)
METRICS = "metrics.json"  # the trainer writes it after the SavedModel: present = complete


# ---------------------------------------------------------------- storage


def path_exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except BeamIOError:
        return False


def run_ids_with(root: str, relative: str) -> list[str]:
    """Sorted ids of the runs under `root` that hold `relative` (e.g. 'data/manifest.json')."""
    pattern = manifest_lib.join(root, f"{RUNS}/*/{relative}")
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except BeamIOError:
        return []  # no runs/ yet
    prefix = manifest_lib.join(root, RUNS).rstrip("/") + "/"
    return sorted({m.path[len(prefix):].split("/", 1)[0] for m in matches
                   if m.path.startswith(prefix)})


def has_files(folder: str) -> bool:
    try:
        return bool(FileSystems.match([folder.rstrip("/") + "/**"])[0].metadata_list)
    except BeamIOError:
        return False


def run_dir(root: str, run_id: str) -> str:
    return manifest_lib.join(root, f"{RUNS}/{run_id}")


def new_run_id() -> str:
    """UTC time to the microsecond: unique per root and sorting in time order."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now % 1 * 1e6):06d}"


def read_current(root: str) -> dict | None:
    path = manifest_lib.join(root, CURRENT)
    return read_json(path) if path_exists(path) else None


# ---------------------------------------------------------------- input fingerprint


def input_fingerprint(config: RetrainConfig) -> tuple[str, int]:
    """(sha256 hex, number of files): changes when any input file is added, removed or
    rewritten (size or modification time), or the labels CSV, the preprocess flags or
    the trainer flags change. One listing call (per CSV: one per listed uri); nothing
    is read or decoded. Raises InputError if the input cannot be listed."""
    preprocess = config.preprocess
    if preprocess.labels_csv:
        listing = list_labels_csv(preprocess.labels_csv)
        with FileSystems.open(preprocess.labels_csv, compression_type="uncompressed") as f:
            csv_hash = hashlib.sha256(f.read()).hexdigest()
        files = []
        uris = [s.uri for s in listing.sources]
        for uri, result in zip(uris, FileSystems.match(uris), strict=True):
            found = result.metadata_list
            files.append((uri, found[0].size_in_bytes, found[0].last_updated_in_seconds)
                         if found else (uri, -1, -1))
        files.extend((s.uri, -1, -1) for s in listing.skipped)
    else:
        csv_hash = None
        files = _list_files(preprocess.input)
    settings = {key: value for key, value in preprocess.to_json().items()
                if key not in ("baseline_stats", "reuse_from")}
    payload = json.dumps({"files": files, "labels_csv": csv_hash, "preprocess": settings,
                          "trainer": list(config.trainer_args)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest(), len(files)


def _list_files(root: str) -> list[tuple[str, int, float]]:
    """(path relative to root, size, mtime) of every file under root but dot-files, which
    the preprocess job ignores too."""
    root = root.rstrip("/")
    try:
        matches = FileSystems.match([root + "/**"])[0].metadata_list
    except Exception as err:  # noqa: BLE001 - storage clients raise many kinds; all mean "cannot list"
        raise InputError(f"cannot list {root}: {err}") from err
    files = []
    for meta in matches:
        relative = meta.path[len(root):].lstrip("/")
        if not any(part.startswith(".") for part in relative.split("/")):
            files.append((relative, meta.size_in_bytes, meta.last_updated_in_seconds))
    if not files:
        raise InputError(f"no files found under {root}")
    return sorted(files)


class BaselineChanged(RuntimeError):
    """current.json no longer names the model the candidate was gated against."""


def promotion_pointer(root: str, run_id: str, model_dir: str, metrics: dict,
                      manifest: manifest_lib.Manifest,
                      evaluation: dict, previous: dict | None) -> dict:
    """What current.json says once this run's model (complete: metrics.json) serves."""
    return {
        "run_id": run_id,
        "saved_model": metrics["saved_model"],
        "model_dir": model_dir,
        # Where a later tick warm-starts from (trainer: AIP_CHECKPOINT_DIR or here).
        "checkpoints": manifest_lib.join(model_dir, "checkpoints"),
        "data": manifest_lib.join(run_dir(root, run_id), DATA),
        "labels": metrics["labels"],
        "model": metrics.get("model"),
        "image": list(manifest.image.size),
        "metrics": {"gate_test": evaluation, "validation": metrics.get("validation"),
                    "test": metrics.get("test")},
        "promoted_at": utc_text(time.time()),
        "previous_run_id": previous["run_id"] if previous else None,
    }


def swap_current(root: str, pointer: dict, expected_run_id: str | None) -> None:
    """Replaces current.json with `pointer` only if it still names `expected_run_id`
    (None: only if there is none): a compare-and-swap, by GCS generation precondition
    on gs://, and on local roots by a re-check under the tick's lock. Raises
    BaselineChanged otherwise, leaving current.json as it is."""
    path = manifest_lib.join(root, CURRENT)
    if "://" not in path:
        found = read_current(root)
        if (found["run_id"] if found else None) != expected_run_id:
            raise BaselineChanged(f"current.json now names {found and found['run_id']}")
        write_json_atomically(path, pointer)
        return
    bucket, name = ownership.split_gcs(path)
    blob = ownership.gcs_client().bucket(bucket).get_blob(name)
    found = json.loads(blob.download_as_bytes()) if blob is not None else None
    if (found["run_id"] if found else None) != expected_run_id:
        raise BaselineChanged(f"current.json now names {found and found['run_id']}")
    try:
        ownership.gcs_write(path, (json.dumps(pointer, indent=2) + "\n").encode(),
                             if_generation_match=blob.generation if blob is not None else 0)
    except ownership.PreconditionFailed as err:
        raise BaselineChanged("current.json was replaced during the promotion") from err


def utc_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

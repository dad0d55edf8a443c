"""One scheduled retraining tick: incremental preprocess, candidate training, gate, promotion.

    python -m pipelines.retrain --input gs://bucket/raw --root gs://bucket/retrain \
        [--trainer local|vertex] [--gate_margin 0.02] [preprocess, Beam and trainer flags]

Layout under ROOT (local folder or gs://):

    current.json                 the serving model: run id, SavedModel, metrics; replaced
                                 atomically, only ever pointing at a complete model
    runs/<run_id>/data/          preprocess output (complete iff it has manifest.json)
    runs/<run_id>/model/         trainer output (complete iff it has metrics.json)
    runs/<run_id>/retrain.json   the tick's record, written last

A tick (`tick`):
  1. fingerprints the input listing (every file's uri, size, mtime) together with the
     preprocess and trainer flags; if the last finished tick saw the same fingerprint it
     writes a `no_new_data` record and stops: no Beam job, no training.
  2. preprocesses into runs/<id>/data with `--reuse_from` the latest complete earlier
     output (images stored with the same image config are copied, not decoded) and
     `--baseline_stats` its statistics (drift).
  3. trains a candidate into runs/<id>/model, warm-started from the current model's
     checkpoints when labels, model and image size are unchanged.
  4. evaluates candidate and current model on this run's test split (`pipelines.retraining.gate`)
     and, if the gate passes, writes a `promoting` record, then swaps current.json only
     if it still names the model the candidate was gated against (`swap_current`); if
     another promotion came first, it gates again against that model.
  5. writes runs/<id>/retrain.json.
A tick holds ROOT/_TICK_IN_PROGRESS (`pipelines.contract.ownership`) throughout: a second tick on
the same root is refused. A tick killed at any point leaves current.json as it was, or
swapped whole; a run folder without retrain.json, or whose `promoting` record names a
model current.json does not, is not a finished tick for the next one, except that a
complete data/ in it is the newest output to reuse from.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads (gate)

import argparse
import dataclasses
import hashlib
import json
import re
import signal
import sys
import time
from collections.abc import Sequence

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions

from pipelines import run as run_lib
from pipelines.cloud import access
from pipelines.cloud import deploy as deploy_lib
from pipelines.cloud import dry_run as dry_run_lib
from pipelines.cloud import vertex as vertex_lib
from pipelines.contract import manifest as manifest_lib
from pipelines.contract import ownership
from pipelines.contract.command import prog
from pipelines.contract.jsonio import read_json, write_json_atomically
from pipelines.preprocessing.options import PreprocessConfig, UsageError, refuse_glob_characters
from pipelines.preprocessing.options import parse_args as parse_preprocess_args
from pipelines.preprocessing.sources import InputError, list_labels_csv
from pipelines.retraining import gate as gate_lib

FORMAT_VERSION = 1
CURRENT = "current.json"
RECORD = "retrain.json"
RUNS, DATA, MODEL = "runs", "data", "model"
TICK_CLAIM = "_TICK_IN_PROGRESS"  # one tick per root (pipelines.contract.ownership: flock / lease)
FINISHED = ("promoted", "rejected", "no_new_data")  # a record's statuses that end a tick
METRICS = "metrics.json"  # the trainer writes it after the SavedModel: present = complete
# Flags each tick sets per run; given on the command line they would fight the tick.
OWNED_FLAGS = ("--output", "--reuse_from", "--baseline_stats", "--overwrite", "--data",
               "--model_dir", "--warm_start")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StepFailed(RuntimeError):
    """A step of the tick (preprocess, training) did not complete."""


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """One tick's settings, fixed and validated before any work starts."""

    root: str
    preprocess: PreprocessConfig  # parsed from preprocess_args (output is a placeholder)
    preprocess_args: tuple[str, ...]  # preprocess and Beam flags, forwarded as given
    trainer_args: tuple[str, ...]  # trainer flags, forwarded as given
    model: str  # the trainer's --model (warm start needs the same architecture)
    trainer: str = "local"  # local (a subprocess) | vertex (a Vertex AI custom job)
    rule: gate_lib.GateRule = gate_lib.GateRule()
    run_id: str | None = None
    vertex: vertex_lib.VertexConfig | None = None
    trainer_warm_start: bool = True  # the trainer has --warm_start
    dry_run: bool = False  # print the plan only (`dry_run`)
    check: bool = False  # with dry_run: the online checks too
    # --deploy_endpoint: where a promoted model is deployed (artifact_uri and model_id
    # are each run's); None: promotion only rewrites current.json.
    deploy: deploy_lib.DeployConfig | None = None


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pipelines.retrain"), allow_abbrev=False,
        description="One retraining tick: preprocess new images (reusing earlier runs' "
        "shards), train a candidate, gate it against the current model, promote. Other "
        "flags go to the preprocess job (and Beam) or the trainer.",
    )
    parser.add_argument("--root", required=True,
                        help="folder or gs:// prefix holding current.json and runs/")
    parser.add_argument("--trainer", choices=("local", "vertex"), default="local",
                        help="train in a local subprocess or as a Vertex AI custom job")
    parser.add_argument("--gate_metric", choices=sorted(gate_lib.METRICS), default="accuracy",
                        help="what the gate compares: accuracy, loss, or macro_recall (the "
                        "mean of per-class recalls)")
    parser.add_argument("--gate_max_class_drop", type=float, metavar="X",
                        help="also refuse a candidate if any class's recall falls more than X "
                        "below the current model's (e.g. 0.1; default: not checked)")
    parser.add_argument("--gate_margin", type=float, default=gate_lib.GateRule.margin,
                        help="how much worse than the current model the candidate may be "
                        "and still be promoted (metric units; default 0.02)")
    parser.add_argument("--block_on_drift", choices=sorted(gate_lib.DRIFT_BLOCKING),
                        default="error", help="drift anomaly severities that block promotion")
    parser.add_argument("--run_id", help="name of the run folder (default: UTC time); run "
                        "ids must sort in time order")
    vertex_lib.add_arguments(parser)  # the same as `python -m pipelines.run`
    parser.add_argument("--dry_run", action="store_true",
                        help="print the tick's plan without touching Google Cloud (the Vertex "
                        "AI job body as JSON on stdout); run nothing")
    parser.add_argument("--check", action="store_true",
                        help="with --dry_run: also make the online checks (credentials, "
                        "endpoints, the input's size, what --root holds)")
    group = parser.add_argument_group("Vertex AI endpoint (--deploy_endpoint)")
    group.add_argument("--deploy_endpoint", metavar="NAME|ID",
                       help="deploy each promoted model to this Vertex AI endpoint (a display "
                       "name, created if no endpoint has it, or an ID); needs a gs:// "
                       "--root, --project and --region (or --vertex_region)")
    deploy_lib.add_arguments(group, prefix="deploy_")  # as `python -m pipelines.deploy`
    return parser


def parse_args(argv: Sequence[str]) -> RetrainConfig:
    """Command line -> RetrainConfig; every step's flags are checked now. Raises UsageError."""
    from trainer import config as trainer_config

    argv = list(argv)
    for token in argv:
        if token.split("=", 1)[0] in OWNED_FLAGS:
            raise UsageError(f"{token.split('=', 1)[0]} is set by the tick for each run "
                             "(under --root); leave it out")
    trainer_args, rest = run_lib.split_trainer_flags(argv)
    known, preprocess_args = _parser().parse_known_args(rest)
    if known.run_id and not _RUN_ID.fullmatch(known.run_id):
        raise UsageError(f"--run_id {known.run_id!r}: letters, digits, '.', '_', '-' only")
    root = known.root.rstrip("/")
    refuse_glob_characters("--root", root)
    preprocess, options = parse_preprocess_args(
        [*preprocess_args, "--output", manifest_lib.join(root, f"{RUNS}/_")])
    try:
        train = trainer_config.parse_args([*trainer_args, "--data", "-", "--model_dir", "-"],
                                          environ={})
    except trainer_config.UsageError as err:
        raise UsageError(f"trainer flags {' '.join(trainer_args)}: {err}") from err
    vertex = (_vertex_config(known, options.view_as(GoogleCloudOptions), root, trainer_args)
              if known.trainer == "vertex" else None)
    drop = known.gate_max_class_drop
    if drop is not None and not 0 <= drop <= 1:
        raise UsageError(f"--gate_max_class_drop {drop:g}: a recall difference, 0 to 1")
    return RetrainConfig(
        root=root,
        preprocess=preprocess,
        preprocess_args=tuple(preprocess_args),
        trainer_args=tuple(trainer_args),
        model=train.model,
        trainer=known.trainer,
        rule=gate_lib.GateRule(known.gate_metric, known.gate_margin, known.block_on_drift,
                               known.gate_max_class_drop),
        run_id=known.run_id,
        vertex=vertex,
        trainer_warm_start="--warm_start" in run_lib.trainer_flag_arity(),
        dry_run=known.dry_run,
        check=known.check,
        deploy=(_deploy_config(known, options.view_as(GoogleCloudOptions), root)
                if known.deploy_endpoint else None),
    )


def _deploy_config(known: argparse.Namespace, cloud: GoogleCloudOptions,
                   root: str) -> deploy_lib.DeployConfig:
    """Where promoted models go, checked by building the requests now (UsageError);
    each run fills in its SavedModel and model ID."""
    if not root.startswith("gs://"):
        raise UsageError("--deploy_endpoint needs a gs:// --root (Vertex AI reads models "
                         "from gs:// only)")
    try:
        return deploy_lib.config_from_args(
            known, prefix="deploy_", project=cloud.project,
            region=known.vertex_region or cloud.region, endpoint=known.deploy_endpoint,
            artifact_uri=manifest_lib.join(root, f"{RUNS}/_/{MODEL}"),
            model_id=deploy_lib.model_id_for("_"))
    except vertex_lib.SpecError as err:
        raise UsageError(f"--deploy_endpoint: {err}") from err


def _vertex_config(known: argparse.Namespace, cloud: GoogleCloudOptions, root: str,
                   trainer_args: Sequence[str]) -> vertex_lib.VertexConfig:
    """The Vertex AI job settings, checked by building a job now (UsageError)."""
    try:
        return vertex_lib.config_from_args(
            known, project=cloud.project, region=cloud.region,
            service_account=cloud.service_account_email,
            base_output_dir=manifest_lib.join(root, f"{RUNS}/_/{MODEL}"),  # each run's, later
            where="--root", trainer_args=trainer_args)
    except vertex_lib.SpecError as err:
        raise UsageError(str(err)) from err


# ---------------------------------------------------------------- storage


def _exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except BeamIOError:
        return False


def _run_ids_with(root: str, relative: str) -> list[str]:
    """Sorted ids of the runs under `root` that hold `relative` (e.g. 'data/manifest.json')."""
    pattern = manifest_lib.join(root, f"{RUNS}/*/{relative}")
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except BeamIOError:
        return []  # no runs/ yet
    prefix = manifest_lib.join(root, RUNS).rstrip("/") + "/"
    return sorted({m.path[len(prefix):].split("/", 1)[0] for m in matches
                   if m.path.startswith(prefix)})


def _has_files(folder: str) -> bool:
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
    return read_json(path) if _exists(path) else None


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


# ---------------------------------------------------------------- steps


def run_step(command: Sequence[str], step: str) -> None:
    """Runs one step as a child process (`pipelines.run.run_child`: SIGTERM is passed on,
    and the trainer checkpoints on it); raises StepFailed unless it exits 0."""
    _log(f"{step}: {' '.join(command[1:])}")
    code = run_lib.run_child(command)
    if code != 0:
        raise StepFailed(f"{step} exited with status {code}")


def preprocess_step(config: RetrainConfig, data: str, previous: str | None) -> dict:
    """Runs the preprocess job into `data`, reusing `previous` (an earlier complete
    output) and comparing statistics with its; returns the new manifest."""
    command = [sys.executable, "-m", "pipelines.preprocess", *config.preprocess_args,
               "--output", data]
    if previous:
        command += ["--reuse_from", previous]
        earlier = manifest_lib.read_manifest(previous)
        if earlier.statistics:
            command += ["--baseline_stats", manifest_lib.join(previous, earlier.statistics)]
    run_step(command, "preprocess")
    return manifest_lib.read_manifest(data)


def drift_summary(data: str, manifest: manifest_lib.Manifest,
                  rule: gate_lib.GateRule) -> dict:
    """This run's drift against the previous output's statistics, and what blocks."""
    if not manifest.anomalies:
        return {"baseline": None, "anomalies": [], "blocking": [], "metrics": {},
                "note": "the preprocess output has no anomalies file"}
    found = read_json(manifest_lib.join(data, manifest.anomalies))
    anomalies = found.get("anomalies", [])
    return {"baseline": found.get("baseline"), "anomalies": anomalies,
            "blocking": gate_lib.blocking_anomalies(anomalies, rule),
            "metrics": found.get("metrics", {})}


def warm_start_from(config: RetrainConfig, current: dict | None,
                    manifest: manifest_lib.Manifest) -> tuple[str | None, str]:
    """(checkpoint folder to start from or None, why): only a model with the same labels,
    architecture and image size can lend its weights."""
    if current is None:
        return None, "no current model: from scratch"
    image = list(manifest.image.size)
    if current.get("labels") != list(manifest.labels):
        return None, f"label set changed since run {current['run_id']}: from scratch"
    if current.get("model") != config.model:
        return None, f"model {config.model} differs from the current {current.get('model')}"
    if current.get("image") != image:
        return None, f"image size {image} differs from the current {current.get('image')}"
    if not config.trainer_warm_start:
        return None, "the trainer has no --warm_start flag: from scratch"
    checkpoints = current.get("checkpoints")
    if not checkpoints or not _exists(manifest_lib.join(checkpoints, "checkpoint")):
        return None, f"run {current['run_id']} left no checkpoint: from scratch"
    return checkpoints, f"warm start from run {current['run_id']} (same labels and model)"


def train_step(config: RetrainConfig, run_id: str, data: str, model_dir: str,
               warm_start: str | None) -> dict:
    """Trains the candidate into `model_dir`; returns its metrics.json."""
    args = [*config.trainer_args, "--data", data, "--model_dir", model_dir]
    if warm_start:
        args += ["--warm_start", warm_start]
    if config.trainer == "vertex":
        train_on_vertex(dataclasses.replace(
            config.vertex, base_output_dir=model_dir,
            display_name=f"imagebeam-retrain-{run_id}"), args)
    else:
        run_step([sys.executable, "-m", "trainer.task", *args], "trainer")
    metrics_path = manifest_lib.join(model_dir, METRICS)
    if not _exists(metrics_path):
        raise StepFailed(f"the trainer finished without writing {metrics_path}")
    metrics = read_json(metrics_path)
    if not _exists(manifest_lib.join(metrics["saved_model"], "saved_model.pb")):
        raise StepFailed(f"no SavedModel at {metrics['saved_model']}")
    return metrics


def train_on_vertex(config: vertex_lib.VertexConfig, trainer_args: Sequence[str]) -> None:
    """Submits the trainer as a Vertex AI CustomJob and follows it to its end. A tick
    stopped meanwhile cancels the job: no GPU keeps running for a tick that is gone."""
    job = vertex_lib.build_custom_job(config, trainer_args)
    client = vertex_lib.job_client(config.region)
    created = vertex_lib.submit(job, config.project, config.region, client=client)
    _log(f"trainer: Vertex AI job {created.name} ({vertex_lib.describe(job)})")
    try:
        state = vertex_lib.wait(created.name, client)
    except BaseException:
        client.cancel_custom_job(name=created.name)
        raise
    if state.name != "JOB_STATE_SUCCEEDED":
        raise StepFailed(f"Vertex AI job {created.name} ended {state.name}")


def gate_step(data: str, manifest: manifest_lib.Manifest, metrics: dict,
              current: dict | None) -> tuple[dict, dict | None]:
    """(candidate, current) evaluated on this run's test split; current None if none."""
    def batches():
        return gate_lib.split_examples(data, manifest, "test")

    candidate = gate_lib.evaluate(metrics["saved_model"], metrics["labels"], batches())
    baseline = (gate_lib.evaluate(current["saved_model"], current["labels"], batches())
                if current else None)
    return candidate, baseline


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
        "promoted_at": _utc(time.time()),
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


# ---------------------------------------------------------------- the tick


@dataclasses.dataclass
class RetrainRecord:
    """`retrain.json`: what one tick did. Written when the tick ends, and once before a
    promotion's swap (status `promoting`); `to_json` is the file's content."""

    run_id: str
    started_at: str
    input: str | None
    root: str
    fingerprint: str  # of the input listing and the flags: "nothing new" compares it
    input_files: int
    current_before: str | None  # the run current.json named when the tick began
    settings: dict  # trainer, gate rule, preprocess and trainer flags
    status: str = "running"  # promoted | rejected | no_new_data | promoting
    promoted: bool = False
    reason: str = ""
    same_as_run: str | None = None  # no_new_data: the run that saw this input
    reused_from_run: str | None = None
    images_written: int = 0
    decoded: int = 0
    reused: int = 0
    accounting: dict | None = None  # the preprocess manifest's
    splits: dict | None = None  # {split: examples}
    labels: list | None = None
    drift: dict | None = None
    warm_start: dict | None = None  # {checkpoints, reason}
    candidate: dict | None = None  # {run_id, saved_model, test, trainer}
    baseline: dict | None = None  # the current model's gate evaluation, None if none
    deployment: dict | None = None  # --deploy_endpoint: what was deployed, or the error
    finished_at: str | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def tick(config: RetrainConfig) -> RetrainRecord:
    """One tick as the module docstring describes, holding the root's tick claim (a second
    tick on the same root is refused with OutputRefused); returns the record it wrote."""
    run_id = config.run_id or new_run_id()
    claim = ownership.acquire(
        manifest_lib.join(config.root, TICK_CLAIM),
        ownership.ClaimRecord(run_id=run_id, entries=(), created_at=time.time(),
                              pid=os.getpid()))
    try:
        return _tick(config, run_id, claim)
    finally:
        claim.release(remove=True)


def last_finished_record(root: str, current: dict | None) -> dict | None:
    """The newest record of a tick that ended. A `promoting` record (killed between its
    record and the swap) counts as promoted if current.json names its run, else not at
    all: that candidate was never served."""
    for run_id in reversed(_run_ids_with(root, RECORD)):
        record = read_json(manifest_lib.join(run_dir(root, run_id), RECORD))
        if record.get("status") == "promoting" and current and current["run_id"] == run_id:
            return {**record, "status": "promoted"}
        if record.get("status", "promoted") in FINISHED:
            return record
    return None


def _tick(config: RetrainConfig, run_id: str, claim: ownership.OutputClaim) -> RetrainRecord:
    started = time.time()
    root = config.root
    folder = run_dir(root, run_id)
    if _has_files(folder):
        raise UsageError(f"{folder} exists; give another --run_id")
    current = read_current(root)
    last = last_finished_record(root, current)
    fingerprint, num_files = input_fingerprint(config)
    record = RetrainRecord(
        run_id=run_id,
        started_at=_utc(started),
        input=config.preprocess.input or config.preprocess.labels_csv,
        root=root,
        fingerprint=fingerprint,
        input_files=num_files,
        current_before=current["run_id"] if current else None,
        settings={"trainer": config.trainer, "gate": dataclasses.asdict(config.rule),
                  "preprocess_args": list(config.preprocess_args),
                  "trainer_args": list(config.trainer_args)},
    )
    timings = {"check_s": round(time.time() - started, 2)}

    if last is not None and last.get("fingerprint") == fingerprint:
        same_as = last.get("same_as_run") or last["run_id"]
        record.status, record.same_as_run = "no_new_data", same_as
        record.reason = (f"input and flags unchanged since run {same_as} ({num_files} files): "
                         "nothing to do")
        return _finish(record, folder, timings, started)

    previous_runs = _run_ids_with(root, f"{DATA}/{manifest_lib.MANIFEST}")
    previous = (manifest_lib.join(run_dir(root, previous_runs[-1]), DATA)
                if previous_runs else None)
    data = manifest_lib.join(folder, DATA)
    manifest = preprocess_step(config, data, previous)
    timings["preprocess_s"] = round(time.time() - started - sum(timings.values()), 2)
    accounting = manifest.accounting
    reused = accounting.reused
    drift = {"baseline_run": previous_runs[-1] if previous_runs else None,
             **drift_summary(data, manifest, config.rule)}
    record = dataclasses.replace(
        record,
        reused_from_run=previous_runs[-1] if previous_runs else None,
        images_written=accounting.images_written,
        decoded=accounting.images_written - reused,
        reused=reused,
        accounting=dataclasses.asdict(accounting),
        splits={name: split.num_examples for name, split in manifest.splits.items()},
        labels=list(manifest.labels),
        drift=drift,
    )
    _log(f"data: {record.decoded} decoded, {reused} reused "
         f"(from {record.reused_from_run}), {len(drift['anomalies'])} drift anomalies")

    warm_start, why = warm_start_from(config, current, manifest)
    record.warm_start = {"checkpoints": warm_start, "reason": why}
    model_dir = manifest_lib.join(folder, MODEL)
    metrics = train_step(config, run_id, data, model_dir, warm_start)
    timings["train_s"] = round(time.time() - started - sum(timings.values()), 2)

    for _attempt in range(3):
        candidate, baseline = gate_step(data, manifest, metrics, current)
        decision = gate_lib.decide(candidate, baseline, drift["blocking"], config.rule)
        record = dataclasses.replace(
            record,
            candidate={"run_id": run_id, "saved_model": metrics["saved_model"],
                       "test": candidate,
                       "trainer": {k: metrics.get(k) for k in ("epochs", "validation", "test")}},
            baseline=({"run_id": current["run_id"], "saved_model": current["saved_model"],
                       "test": baseline} if current else None),
            status="promoting" if decision.promoted else "rejected",
            promoted=False, reason=decision.reason,
        )
        if not decision.promoted:
            break
        if claim.lost:
            raise StepFailed(f"{claim.lost}; not promoting")
        # The record first: a kill before the swap leaves `promoting` beside an unchanged
        # current.json, which the next tick reads as "never served".
        write_json_atomically(manifest_lib.join(folder, RECORD), record.to_json())
        try:
            swap_current(root, promotion_pointer(root, run_id, model_dir, metrics, manifest,
                                                 candidate, current),
                         current["run_id"] if current else None)
        except BaselineChanged as err:
            _log(f"{err}: gating again against the model that serves now")
            current = read_current(root)
            continue
        record.status, record.promoted = "promoted", True
        break
    else:
        record.status, record.promoted = "rejected", False
        record.reason = "current.json kept changing during the gate; not promoted"
    timings["gate_s"] = round(time.time() - started - sum(timings.values()), 2)
    if config.deploy is not None:
        record.deployment = (deploy_step(config.deploy, run_id, metrics["saved_model"])
                             if record.promoted else None)
        timings["deploy_s"] = round(time.time() - started - sum(timings.values()), 2)
    return _finish(record, folder, timings, started)


def deploy_step(config: deploy_lib.DeployConfig, run_id: str, saved_model: str) -> dict:
    """Deploys the promoted model; returns the ids of what it created
    (`deploy_lib.DeployResult`) or, when it failed, the error. current.json is already
    swapped then, and stays so: the model is promoted whether or not it is deployed."""
    config = dataclasses.replace(config, artifact_uri=saved_model,
                                 model_id=deploy_lib.model_id_for(run_id))
    _log(f"deploy: {saved_model} -> endpoint {config.endpoint} ({config.traffic}% of its "
         "traffic)")
    try:
        return deploy_lib.deploy(config).to_json()
    except Exception as err:  # noqa: BLE001 - credentials, API, timeout: all go in the record
        return {"endpoint": config.endpoint, "model_id": config.model_id,
                "error": f"{type(err).__name__}: {err}"[:2000]}


def _finish(record: RetrainRecord, folder: str, timings: dict, started: float
            ) -> RetrainRecord:
    timings["total_s"] = round(time.time() - started, 2)
    record.finished_at, record.timings = _utc(time.time()), timings
    write_json_atomically(manifest_lib.join(folder, RECORD), record.to_json())
    return record


def summary(record: RetrainRecord) -> str:
    """The tick's closing line."""
    took = f"in {record.timings['total_s']:.1f}s"
    if record.status == "no_new_data":
        return f"[retrain] run {record.run_id}: no new data; {record.reason} ({took})"
    baseline = record.baseline["test"] if record.baseline else None
    versus = f" vs current {baseline['accuracy']}" if baseline else ""
    accuracy = record.candidate["test"]["accuracy"]
    return (f"[retrain] run {record.run_id}: {record.decoded} decoded, "
            f"{record.reused} reused; candidate accuracy {accuracy}{versus}: "
            f"{record.status} ({record.reason}) {took}")


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _log(message: str) -> None:
    print(f"[retrain] {message}", file=sys.stderr, flush=True)


def cloud_use(config: RetrainConfig) -> access.CloudUse:
    """What a tick uses on Google Cloud: the preprocess job's, --root, the Vertex AI job."""
    _, options = parse_preprocess_args([*config.preprocess_args, "--output",
                                        config.preprocess.output])
    use = dry_run_lib.preprocess_cloud_use(config.preprocess, options, config.root)
    vertex = config.vertex or config.deploy  # the training job, the endpoint: one region
    return dataclasses.replace(use, vertex_region=vertex.region if vertex else None)


def dry_run(config: RetrainConfig) -> int:
    """Prints the tick's plan (stderr; a Vertex AI job body on stdout) and returns 0; reads
    Google Cloud only with --check. Raises UsageError, InputError or CloudAccessError."""
    run_id = config.run_id or "<UTC time>"
    data, model_dir = (manifest_lib.join(run_dir(config.root, run_id), part)
                       for part in (DATA, MODEL))
    preprocess = dataclasses.replace(config.preprocess, output=data)
    _, options = parse_preprocess_args([*config.preprocess_args, "--output", data])
    lines, size = dry_run_lib.opening(preprocess, cloud_use(config), config.root, config.check)
    lines += [f"1. reads {manifest_lib.join(config.root, CURRENT)} and the runs' {RECORD}; "
              "stops (no_new_data) if the input listing and the flags are unchanged",
              f"2. preprocess into {data}, --reuse_from the newest complete earlier output",
              *[f"  {line}" for line in dry_run_lib.dataflow_lines(options)
                + dry_run_lib.preprocess_lines(preprocess, options)[1:]]]
    job = None
    if config.vertex is not None:
        vertex = dataclasses.replace(config.vertex, base_output_dir=model_dir,
                                     display_name=f"imagebeam-retrain-{run_id}")
        job = vertex_lib.build_custom_job(vertex, [*config.trainer_args, "--data", data,
                                                   "--model_dir", model_dir])
        lines += [f"3. train on Vertex AI in {vertex.project}/{vertex.region}: "
                  f"{vertex_lib.describe(job)}; the CustomJob body is on stdout (JSON)"]
    else:
        lines += [f"3. train here: python -m trainer.task {' '.join(config.trainer_args)} "
                  f"--data {data} --model_dir {model_dir}"]
    lines += ["   warm start from the current model's checkpoints when labels, model and "
              "size are unchanged (checked at run time)",
              f"4. gate ({config.rule.metric}, margin {config.rule.margin:g}, drift blocking "
              f"{config.rule.block_on_drift}) on this run's test split; if it passes, swap "
              f"{manifest_lib.join(config.root, CURRENT)}",
              f"5. write {manifest_lib.join(run_dir(config.root, run_id), RECORD)}"]
    if config.deploy is not None:
        lines += [f"   if promoted, deploy it to Vertex AI endpoint {config.deploy.endpoint} "
                  f"({config.deploy.traffic}% of its traffic; python -m pipelines.deploy "
                  "--dry_run shows the requests); the record keeps the model and endpoint ids"]
    lines += dry_run_lib.cost_lines(size, options, config.vertex)
    if not config.check:
        lines += dry_run_lib.run_time_lines(
            options, f"what {config.root} holds (current.json, earlier runs) and whether "
            "another tick holds it")
    for line in lines:
        _log(line)
    if job is not None:
        print(vertex_lib.job_json(job))
    return 0


def _stop(signum, frame):
    raise SystemExit(143)  # unwinds through run_step, which stops the running child


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 done (promoted, rejected or nothing new; or the
    --dry_run plan printed), 1 a step failed (or the promoted model's deployment), 2 usage
    error (no Google Cloud credentials or an endpoint unreachable included), 143 stopped
    by SIGTERM."""
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if config.dry_run:
            return dry_run(config)
        if config.check:
            raise UsageError("--check goes with --dry_run (a real tick always checks)")
        # Before any listing: Beam and the storage client retry a missing credential or
        # an unreachable endpoint for minutes.
        access.preflight(cloud_use(config))
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        record = tick(config)
    except (UsageError, InputError) as err:  # OutputRefused too: another tick holds the root
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        print(f"error: {err}; current.json is unchanged", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(record), file=sys.stderr)
    failed = (record.deployment or {}).get("error")
    if failed:
        print(f"error: deploying the promoted model failed ({failed.splitlines()[0]}); "
              f"current.json names it: python -m pipelines.deploy --model "
              f"{manifest_lib.join(config.root, CURRENT)} --endpoint "
              f"{config.deploy.endpoint} ... deploys it", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()

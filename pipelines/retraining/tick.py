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

import dataclasses
import signal
import sys
import time
from collections.abc import Sequence

from pipelines import run as run_lib
from pipelines.cloud import access
from pipelines.cloud import deploy as deploy_lib
from pipelines.cloud import dry_run as dry_run_lib
from pipelines.cloud import vertex as vertex_lib
from pipelines.contract import manifest as manifest_lib
from pipelines.contract import ownership
from pipelines.contract.jsonio import read_json, write_json_atomically
from pipelines.preprocessing.options import UsageError
from pipelines.preprocessing.options import parse_args as parse_preprocess_args
from pipelines.preprocessing.sources import InputError
from pipelines.retraining import gate as gate_lib
from pipelines.retraining.options import (
    RetrainConfig,
    _parser,  # noqa: F401 - the Airflow test reads it here
    parse_args,
)
from pipelines.retraining.store import (
    CURRENT,
    DATA,
    METRICS,
    MODEL,
    RECORD,
    TICK_CLAIM,
    BaselineChanged,
    has_files,
    input_fingerprint,
    new_run_id,
    path_exists,
    promotion_pointer,
    read_current,
    run_dir,
    run_ids_with,
    swap_current,
    utc_text,
)

FORMAT_VERSION = 1
FINISHED = ("promoted", "rejected", "no_new_data")  # a record's statuses that end a tick
class StepFailed(RuntimeError):
    """A step of the tick (preprocess, training) did not complete."""


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
    if not checkpoints or not path_exists(manifest_lib.join(checkpoints, "checkpoint")):
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
    if not path_exists(metrics_path):
        raise StepFailed(f"the trainer finished without writing {metrics_path}")
    metrics = read_json(metrics_path)
    if not path_exists(manifest_lib.join(metrics["saved_model"], "saved_model.pb")):
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
    for run_id in reversed(run_ids_with(root, RECORD)):
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
    if has_files(folder):
        raise UsageError(f"{folder} exists; give another --run_id")
    current = read_current(root)
    last = last_finished_record(root, current)
    fingerprint, num_files = input_fingerprint(config)
    record = RetrainRecord(
        run_id=run_id,
        started_at=utc_text(started),
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

    previous_runs = run_ids_with(root, f"{DATA}/{manifest_lib.MANIFEST}")
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
    record.finished_at, record.timings = utc_text(time.time()), timings
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

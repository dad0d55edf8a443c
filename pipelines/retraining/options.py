"""The retraining tick's settings: its command line, parsed and checked before any work
starts (`parse_args`), into one RetrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence

from apache_beam.options.pipeline_options import GoogleCloudOptions

from pipelines import run as run_lib
from pipelines.cloud import deploy as deploy_lib
from pipelines.cloud import vertex as vertex_lib
from pipelines.contract import manifest as manifest_lib
from pipelines.contract.command import prog
from pipelines.preprocessing.options import PreprocessConfig, UsageError, refuse_glob_characters
from pipelines.preprocessing.options import parse_args as parse_preprocess_args
from pipelines.retraining import gate as gate_lib
from pipelines.retraining.store import MODEL, RUNS

# Flags each tick sets per run; given on the command line they would fight the tick.
OWNED_FLAGS = ("--output", "--reuse_from", "--baseline_stats", "--overwrite", "--data",
               "--model_dir", "--warm_start")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")




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



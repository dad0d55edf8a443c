"""One command from raw images to a trained model: preprocess, then train.

    python -m pipelines.run --input gs://bucket/raw --output gs://bucket/run1 \\
        [--trainer local|vertex] [--dry_run] \\
        [preprocess flags, Beam flags: --image_size 224 --runner DataflowRunner --project P ...] \\
        [trainer flags: --epochs 10 --model small_cnn --batch_size 64 ...] \\
        [vertex flags: --trainer_image URI --vertex_machine_type g2-standard-8 ...]

Under --output: `prep/` is the preprocess output (shards, manifest.json) and `model/` the
trainer's model_dir (metrics.json, saved_model/, checkpoints/, logs/; on Vertex AI the
SavedModel goes to model/model/, where Vertex's AIP_MODEL_DIR points).

Flags are routed by name: the trainer's (trainer/config.py) go to `python -m trainer.task`,
this command's own (below) stay here, everything else goes to `python -m
pipelines.preprocess`, which checks it. Both steps run as child processes whose output is
streamed as it comes; with the DataflowRunner the preprocess step waits for the Dataflow
job. `--trainer vertex` submits a CustomJob (pipelines/cloud/vertex.py) and follows it.

Rerunning the same command resumes: a complete prep/ made with the same settings is reused
(pass --overwrite to redo it) and the trainer continues from its last checkpoint.
`--dry_run` runs and submits nothing and touches no cloud: it checks every flag, prints the
plan (pipelines/cloud/dry_run.py: Dataflow options and worker setup, what is read and
written, a rough cost, what only the run can check), and for Vertex AI prints the CustomJob
request body (JSON) on stdout; `--dry_run --check` also makes the online checks. A real run
first checks credentials and endpoints (pipelines/cloud/access.py): one line and exit 2
when they are missing or unreachable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from google.cloud import aiplatform_v1 as aip

from pipelines.cloud import access, dataflow, vertex
from pipelines.cloud import dry_run as dry_run_lib
from pipelines.contract.command import prog
from pipelines.contract.manifest import join, read_manifest
from pipelines.preprocessing import options as preprocess_options
from pipelines.preprocessing.options import PreprocessConfig, UsageError
from pipelines.preprocessing.sources import InputError

PREP_DIR = "prep"
MODEL_DIR = "model"
# Trainer flags this command sets itself.
_TRAINER_FLAGS_SET_HERE = ("--data", "--model_dir")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The two steps, fully resolved."""

    args: argparse.Namespace  # this command's own flags
    preprocess_argv: tuple[str, ...]
    trainer_argv: tuple[str, ...]  # without --data/--model_dir
    config: PreprocessConfig
    gcp: GoogleCloudOptions  # --project, --region, --service_account_email (Beam's flags)
    options: PipelineOptions  # every Beam flag, as preprocess gets them

    @property
    def prep(self) -> str:
        return self.config.output

    @property
    def model_dir(self) -> str:
        return join(self.args.output.rstrip("/"), MODEL_DIR)

    def preprocess_command(self) -> list[str]:
        return [sys.executable, "-m", "pipelines.preprocess", *self.preprocess_argv]

    def trainer_args(self) -> list[str]:
        return ["--data", self.prep, "--model_dir", self.model_dir, *self.trainer_argv]

    def trainer_command(self) -> list[str]:
        return [sys.executable, "-m", "trainer.task", *self.trainer_args()]

    def cloud_use(self) -> access.CloudUse:
        """What both steps use on Google Cloud (checked up front by `access.preflight`)."""
        use = dry_run_lib.preprocess_cloud_use(self.config, self.options, self.model_dir)
        if self.args.trainer != "vertex":
            return use
        return dataclasses.replace(use, vertex_region=self.args.vertex_region or self.gcp.region)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pipelines.run"),
        # No prefix matching: an abbreviated preprocess or Beam flag must not be taken here.
        allow_abbrev=False,
        description="Preprocess raw images, then train on the result (locally or on Vertex "
        "AI). Preprocess and Beam flags (python -m pipelines.preprocess --help) and trainer "
        "flags (python -m trainer.task --help) are passed on.",
    )
    parser.add_argument("--output", required=True,
                        help="root folder or gs:// prefix: prep/ and model/ go under it")
    parser.add_argument("--trainer", choices=("local", "vertex"), default="local",
                        help="local: a child process here (default); vertex: a Vertex AI "
                        "CustomJob with a GPU")
    parser.add_argument("--dry_run", action="store_true",
                        help="check every flag and print the plan (the Vertex AI job as JSON "
                        "on stdout) without touching Google Cloud; run and submit nothing")
    parser.add_argument("--check", action="store_true",
                        help="with --dry_run: also make the online checks (credentials, "
                        "endpoints, the input's size, what --output holds)")
    vertex.add_arguments(parser)
    group = parser.add_argument_group("following the job")
    group.add_argument("--no_wait", action="store_true",
                        help="return once the job is submitted instead of following it")
    return parser


def plan(argv: Sequence[str]) -> Plan:
    """Routes the flags and checks both steps' flags; raises UsageError."""
    args, rest = _parser().parse_known_args(list(argv))
    trainer_argv, preprocess_argv = split_trainer_flags(rest)
    prep = join(args.output.rstrip("/"), PREP_DIR)
    preprocess_argv = [*preprocess_argv, "--output", prep]
    config, beam_options = preprocess_options.parse_args(preprocess_argv)
    dataflow.check(config, beam_options)
    if args.check and not args.dry_run:
        raise UsageError("--check goes with --dry_run (a real run always checks)")
    result = Plan(args, tuple(preprocess_argv), tuple(trainer_argv), config,
                  beam_options.view_as(GoogleCloudOptions), beam_options)
    _check_trainer_flags(result)
    if args.trainer == "vertex":
        vertex_job(result)  # every Vertex AI check, before anything runs
    return result


def trainer_flag_arity() -> dict[str, int]:
    """{--flag: number of values} for every flag of the trainer CLI."""
    from trainer import config as trainer_config

    return {option: 0 if action.nargs == 0 else 1
            for action in trainer_config._parser()._actions
            if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings}


def split_trainer_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(trainer's flags with their values, everything else), order kept within each."""
    arity = trainer_flag_arity()
    trainer, other = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        flag, has_value, _ = arg.partition("=")
        if flag in _TRAINER_FLAGS_SET_HERE:
            raise UsageError(f"{flag} is set by pipelines.run (--output/{PREP_DIR}, "
                             f"--output/{MODEL_DIR})")
        if flag not in arity:
            other.append(arg)
            index += 1
            continue
        take = 0 if has_value else arity[flag]
        if index + take >= len(argv):
            raise UsageError(f"{flag} needs a value")
        trainer.extend(argv[index:index + 1 + take])
        index += 1 + take
    return trainer, other


def _check_trainer_flags(plan_: Plan) -> None:
    from trainer import config as trainer_config

    try:
        trainer_config.parse_args(plan_.trainer_args(), environ={})
    except trainer_config.UsageError as err:
        raise UsageError(str(err)) from err


def vertex_job(plan_: Plan) -> tuple[vertex.VertexConfig, aip.CustomJob]:
    """(VertexConfig, aiplatform_v1.CustomJob) of this plan; raises UsageError."""
    try:
        config = vertex.config_from_args(
            plan_.args, project=plan_.gcp.project, region=plan_.gcp.region,
            service_account=plan_.gcp.service_account_email, base_output_dir=plan_.model_dir,
            where="--output", trainer_args=plan_.trainer_args())
        return config, vertex.build_custom_job(config, plan_.trainer_args())
    except vertex.SpecError as err:
        raise UsageError(str(err)) from err


def reusable_prep(config: PreprocessConfig) -> bool:
    """True if `config.output` is complete and was made with these settings.

    Raises UsageError for a complete output made with other settings (without --overwrite).
    """
    if config.overwrite:
        return False
    try:
        manifest = read_manifest(config.output)
    except FileNotFoundError:
        return False
    if manifest.config == json.loads(json.dumps(config.to_json())):
        return True
    raise UsageError(f"{config.output} holds an output made with other settings; pass "
                     "--overwrite to preprocess again")


def run_child(command: Sequence[str]) -> int:
    """Runs `command`, its output going straight to ours; returns its exit status.

    The child gets its own session so that a terminal's Ctrl-C reaches it once, through
    us; SIGINT and SIGTERM sent to us are passed on, and we wait for it to stop (the
    trainer checkpoints on SIGTERM). A child killed by signal N returns 128 + N.
    """
    child = subprocess.Popen(list(command), start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    try:
        plan_ = plan(sys.argv[1:] if argv is None else argv)
        if plan_.args.dry_run:
            return dry_run(plan_)
        # Before the child processes: Beam would retry a missing credential for minutes.
        access.preflight(plan_.cloud_use())
        reuse = reusable_prep(plan_.config)
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if reuse:
        _say(_REUSING.format(prep=plan_.prep))
    else:
        _say(f"1/2 preprocess -> {plan_.prep}")
        code = run_child(plan_.preprocess_command())
        if code:
            _say(f"preprocessing failed (exit status {code}); nothing was trained")
            return code
    if plan_.args.trainer == "local":
        return _train_locally(plan_)
    return _train_on_vertex(plan_)


_REUSING = ("1/2 preprocess: {prep} is complete with these settings; reusing it (--overwrite "
            "redoes it)")


def dry_run(plan_: Plan) -> int:
    """Prints the plan (stderr; the Vertex AI job body on stdout) and returns 0. Touches
    Google Cloud only with --check; raises UsageError / InputError / CloudAccessError."""
    config, options = plan_.config, plan_.options
    lines, size = dry_run_lib.opening(config, plan_.cloud_use(), plan_.prep, plan_.args.check)
    if "://" not in plan_.prep or plan_.args.check:
        reuse = reusable_prep(config)  # raises for an output made with other settings
    else:
        reuse = False
    lines.append(_REUSING.format(prep=plan_.prep) if reuse else
                 f"1/2 preprocess: {shlex.join(plan_.preprocess_command())}")
    lines += [f"  {line}" for line in (dry_run_lib.dataflow_lines(options)
                                       + dry_run_lib.preprocess_lines(config, options, size))]
    vertex_config, job = vertex_job(plan_) if plan_.args.trainer == "vertex" else (None, None)
    if job is None:
        lines.append(f"2/2 train: {shlex.join(plan_.trainer_command())}")
    else:
        lines += [f"2/2 train on Vertex AI in {vertex_config.project}/{vertex_config.region}: "
                  f"{vertex.describe(job)}",
                  "  the CustomJob request body is on stdout (JSON)"]
    lines.append(f"  writes: {plan_.model_dir}/ (checkpoints/, logs/, saved_model/, "
                 "metrics.json last)")
    lines += dry_run_lib.cost_lines(size if not reuse else None, options, vertex_config)
    if not plan_.args.check:
        lines += dry_run_lib.run_time_lines(options, f"whether {plan_.prep} can be reused")
    for line in lines:
        _say(line)
    if job is not None:
        print(vertex.job_json(job))
    return 0


def _train_locally(plan_: Plan) -> int:
    command = plan_.trainer_command()
    _say(f"2/2 train -> {plan_.model_dir}")
    code = run_child(command)
    if code == 143:
        _say("the trainer stopped on SIGTERM after checkpointing; rerun the same command to "
             "resume")
    elif code == 0:
        _say(f"done: model in {plan_.model_dir}/saved_model, metrics in "
             f"{plan_.model_dir}/metrics.json")
    return code


def _train_on_vertex(plan_: Plan) -> int:
    config, job = vertex_job(plan_)
    _say(f"2/2 train on Vertex AI in {config.project}/{config.region}: {vertex.describe(job)}")
    client = vertex.job_client(config.region)
    created = vertex.submit(job, config.project, config.region, client=client)
    _say(f"submitted {created.name}\n[run] logs:   gcloud ai custom-jobs stream-logs "
         f"{created.name}\n[run] cancel: gcloud ai custom-jobs cancel {created.name}")
    if plan_.args.no_wait:
        return 0
    try:
        state = vertex.wait(created.name, client)
    except KeyboardInterrupt:
        _say("stopped following; the job goes on")
        return 130
    if state.name != "JOB_STATE_SUCCEEDED":
        return 1
    _say(f"done: SavedModel in {plan_.model_dir}/model, metrics in "
         f"{plan_.model_dir}/metrics.json")
    return 0


def _say(line: str) -> None:
    print(f"[run] {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

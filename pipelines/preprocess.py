"""Raw images -> deduplicated, split, shuffled TFRecord shards + manifest.json.

    python -m pipelines.preprocess --input gs://bucket/raw --output gs://bucket/prep
    python -m pipelines.preprocess --labels labels.csv --output out/ --image_size 224,160

The command: `run` checks credentials and endpoints where Google Cloud is used
(`pipelines.cloud.access`), lists the input, claims the output, runs the pipeline
(`pipelines.preprocessing.pipeline.build_pipeline`) and prints the accounting; exit codes
are in `run`'s docstring. `--dry_run` prints the plan without touching Google Cloud
(`pipelines.cloud.dry_run`); `--dry_run --check` adds the online checks.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads; workers inherit it

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.cloud import access, dataflow
from pipelines.cloud import dry_run as dry_run_lib
from pipelines.contract import manifest as manifest_lib
from pipelines.contract import ownership
from pipelines.local import analysis_process
from pipelines.local.progress import ProgressPrinter
from pipelines.preprocessing import decode_workers
from pipelines.preprocessing import output as output_lib
from pipelines.preprocessing.options import (
    PreprocessConfig,
    UsageError,
    decode_processes,
    parse_args,
)
from pipelines.preprocessing.pipeline import (
    LOCAL_RUNNERS,
    build_pipeline,
    check_reuse,
    label_vocabulary,
    list_input,
)
from pipelines.preprocessing.sources import InputError, Listing
from pipelines.stats import phase as stats_phase


class _OwnFailuresFilter(logging.Filter):
    """Drops Beam's logged traceback of a failure `_failed_run` tells in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _failed_run(record.exc_info[1]))


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code: 0 done (or the --dry_run
    plan printed), 1 the run failed (over --max_error_rate, no image written, its claim
    taken over, or a pipeline error), 2 refused before anything was touched (usage, no
    Google Cloud credentials or endpoint unreachable, input, output not ours or in use)."""
    logging.getLogger().setLevel(logging.WARNING)
    beam_logger = logging.getLogger("apache_beam.runners.common")
    if not any(isinstance(f, _OwnFailuresFilter) for f in beam_logger.filters):
        beam_logger.addFilter(_OwnFailuresFilter())
    try:
        # Ours, not Beam's: Beam has a test-only --dry_run of its own.
        flags, rest = _dry_run_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
        config, options = parse_args(rest)
        # Flag mistakes first, offline: they need no credentials to be told.
        ownership.refuse_overlaps(config.output, output_lib.input_paths(config))
        dataflow.check(config, options)
        if flags.dry_run:
            return dry_run(config, options, check=flags.check)
        if flags.check:
            raise UsageError("--check goes with --dry_run (a real run always checks)")
        # Before Beam starts: it retries a missing credential or endpoint for minutes.
        access.preflight(dry_run_lib.preprocess_cloud_use(config, options))
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # First, so that its TensorFlow import overlaps everything below (local runs only).
    with analysis_process.started(options) as analysis:
        return _run(config, options, analysis)


def _dry_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--check", action="store_true")
    return parser


def dry_run(config: PreprocessConfig, options: PipelineOptions, check: bool) -> int:
    """Prints the plan on stderr and returns 0; contacts Google Cloud only if `check`.
    Raises InputError or CloudAccessError (both --check only)."""
    lines, size = dry_run_lib.opening(
        config, dry_run_lib.preprocess_cloud_use(config, options), config.output, check)
    lines += dry_run_lib.dataflow_lines(options)
    lines += dry_run_lib.preprocess_lines(config, options, size)
    lines += dry_run_lib.cost_lines(size, options, None)
    if not check:
        lines += dry_run_lib.run_time_lines(options)
    for line in lines:
        print(f"[preprocess] {line}", file=sys.stderr)
    return 0


def _run(config: PreprocessConfig, options: PipelineOptions, analysis: str | None) -> int:
    try:
        # Before anything is read or deleted: an output overlapping an input is refused.
        ownership.refuse_overlaps(config.output, output_lib.input_paths(config))
        options = dataflow.prepare(config, options)  # checks; what Dataflow workers install
        listing = list_input(config)
        config = check_reuse(config)
        baseline = (stats_phase.load_baseline(config.baseline_stats)
                    if config.baseline_stats else None)
        config = dataclasses.replace(config, run_id=ownership.new_run_id())
        claim = output_lib.prepare_output(
            config, lease_s=(ownership.LEASE_S if dataflow.waits_for_job(options)
                             else ownership.UNFOLLOWED_LEASE_S))
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run_claimed(config, options, analysis, listing, baseline)
    except Exception as err:
        failure = _failed_run(err)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1
    finally:
        claim.release()
        dataflow.remove_scratch_dirs()


def _run_claimed(config: PreprocessConfig, options: PipelineOptions, analysis: str | None,
                 listing: Listing, baseline: bytes | None) -> int:
    local = options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    print(f"[preprocess] {len(listing.sources)} image files, {len(listing.skipped)} skipped, "
          f"{len(label_vocabulary(listing))} labels -> {config.output}", file=sys.stderr)
    started = time.monotonic()
    if processes := decode_processes(config, options):
        decode_workers.shared(processes)  # started now, they load while the pipeline is built
    with _progress(config, listing, local) as progress_dir:
        pipeline = build_pipeline(config, options, listing, progress_dir, baseline,
                                  analysis=analysis)
        # Everything alive once the pipeline is built (Beam's modules, TensorFlow's where
        # tf.Transform runs in this process, the listing, the graph) lives to the end;
        # frozen, the cyclic GC stops rescanning it each time the pipeline's many
        # short-lived objects trigger a collection.
        gc.freeze()
        try:
            result = pipeline.run()
            dataflow.remove_scratch_dirs()  # the wheel is staged
            if local:
                result.wait_until_finish()
            else:  # waits for a Dataflow job; a template or a Flex launch has none
                code = dataflow.follow(result, config, options)
        finally:
            # Free the pipeline's reference cycles now, while every extension module is
            # still loaded; left to the interpreter's last collection they can crash it.
            result = pipeline = None
            gc.unfreeze()  # callers in this process (tests, pipelines.run) get a normal GC
            gc.collect()
    if not local:
        return code
    manifest = manifest_lib.read_manifest(config.output)
    elapsed = time.monotonic() - started
    print(summary(manifest, elapsed), file=sys.stderr)
    return 0


def _failed_run(err: BaseException | None) -> str | None:
    """The one-line story of a run that failed for a reason of ours (too many dead
    letters, its claim taken over), else None: an unexpected error keeps its traceback."""
    ours = (output_lib.TooManyErrors, ownership.ClaimLost)
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        # Worker processes send their errors back as text: find ours by its class name.
        text = str(err) if isinstance(err, ours) else next(
            (str(err).rsplit(f"{kind.__name__}: ", 1)[1] for kind in ours
             if f"{kind.__name__}: " in str(err)), None)
        if text is not None:
            return text.split(" [while running", 1)[0].splitlines()[0]  # Beam adds the step
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _progress(config: PreprocessConfig, listing: Listing, local: bool):
    if not (local and config.progress):
        yield None
        return
    directory = tempfile.mkdtemp(prefix="imagebeam-progress-")
    try:
        with ProgressPrinter(directory, len(listing.sources), label="files"):
            yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def summary(manifest: manifest_lib.Manifest, elapsed_s: float) -> str:
    """The closing lines of a local run: accounting, splits and where things are."""
    accounting = manifest.accounting
    written = accounting.images_written
    splits = ", ".join(
        f"{name} {entry.num_examples} in {len(entry.shards)} shard(s)"
        for name, entry in manifest.splits.items()
    )
    return "\n".join([
        f"[preprocess] done in {elapsed_s:.1f}s ({written / max(elapsed_s, 1e-9):.0f} images/s)",
        f"[preprocess] accounting: {json.dumps(dataclasses.asdict(accounting))}",
        f"[preprocess] splits: {splits}",
        f"[preprocess] labels: {len(manifest.labels)}; dead letters: {manifest.errors_path}",
        *([f"[preprocess] report: {manifest.report}; statistics: {manifest.statistics}; "
           f"transform: {manifest.transform_output}; drift: "
           f"{manifest.anomalies}"] if manifest.report else []),
    ])


def main() -> None:
    code = run()
    # A process that ran tf.Transform can segfault (exit 139) in the interpreter's final
    # garbage collection, after all output is written: protobuf's upb extension frees a
    # repeated-field container held in a Beam/tf.Transform reference cycle after its own
    # module state is gone (PyUpb_RepeatedContainer_Dealloc -> PyModule_GetState(NULL);
    # protocolbuffers/protobuf#22067). run() has finished every write, the manifest
    # included, and gc'd the pipeline; skip the teardown so the exit code tells the truth.
    decode_workers.close_shared()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

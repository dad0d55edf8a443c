"""Raw images -> deduplicated, split, shuffled TFRecord shards + manifest.json.

    python -m pipelines.preprocess --input gs://bucket/raw --output gs://bucket/prep
    python -m pipelines.preprocess --labels labels.csv --output out/ --image_size 224,160

`build_pipeline` returns the unrun pipeline; `run` lists the input, claims the
output, runs, and prints the accounting.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads; workers inherit it

import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines import analysis_process, dataflow, ownership, stats_phase
from pipelines import manifest as manifest_lib
from pipelines.options import (
    PreprocessConfig,
    UsageError,
    decode_threads,
    local_runner,
    parse_args,
)
from pipelines.progress import ProgressPrinter
from pipelines.sources import InputError, Listing, list_class_folders, list_labels_csv
from pipelines.transforms import (
    ERRORS_TAG,
    DecodeSourceFn,
    MergeDuplicates,
    ReadReuseIndex,
    WriteShards,
)

LOCAL_RUNNERS = ("DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner")


def list_input(config: PreprocessConfig) -> Listing:
    """The files to read, from the CSV if given, else from the class folders."""
    if config.labels_csv:
        # With --input too, the CSV's uris must lie under it (default: the CSV's folder).
        return list_labels_csv(config.labels_csv, allowed_root=config.input)
    return list_class_folders(config.input)


def label_vocabulary(listing: Listing) -> list[str]:
    """Sorted labels of every listed image: label id = index (stable across reruns)."""
    return sorted({label for source in listing.sources for label in source.labels})


def build_pipeline(
    config: PreprocessConfig,
    options: PipelineOptions,
    listing: Listing,
    progress_dir: str | None = None,
    baseline: bytes | None = None,
    statistics: bool = True,
    analysis: str | None = None,
) -> beam.Pipeline:
    """The whole job as an unrun pipeline over `listing`, writing to `config.output`.

    `baseline`: serialized statistics to compare with (default: read from
    `config.baseline_stats`). `statistics=False` leaves out the statistics phase
    (statistics, tf.Transform, drift, report): for measuring what it costs.
    `analysis`: the token of a started `analysis_process.AnalysisProcess` (local
    in-memory runs) to run tf.Transform in; None runs it inside the pipeline.
    """
    started = time.time()
    labels = label_vocabulary(listing)
    # The steps after decoding capture these totals, not the listing: Beam pickles (and
    # bz2-compresses) a step's closure each time it builds or runs it (~0.3 s a step at
    # 16,000 files when they captured every SourceFile).
    listing_counts = listing.counts()
    spill_dir = manifest_lib.join(config.output, f"_tmp/spill-{uuid.uuid4().hex[:8]}")
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    # Create reshuffles its elements (a fusion break): the files are spread over the
    # workers before the expensive step; a second Reshuffle here only cost one more encode
    # and shuffle of the whole listing.
    listed = pipeline | "ListedFiles" >> beam.Create(listing.sources, reshuffle=True)
    if dataflow.is_classic_template(options):
        # Each run of a classic template is this same job: it may write only while the
        # claim the build made is still there, i.e. once.
        listed = listed | "CheckTemplateClaim" >> beam.ParDo(
            CheckClaimOnce(config.output, config.run_id))
    decoded = (
        listed
        | "Decode" >> beam.ParDo(DecodeSourceFn(config.image, spill_dir, progress_dir,
                                                decode_threads(config, options)),
                                 **_reuse_side_input(pipeline, config))
        .with_outputs(ERRORS_TAG, main="images")
    )
    unique = decoded.images | "MergeDuplicates" >> MergeDuplicates(config)
    shards = unique | "WriteShards" >> WriteShards(config, labels)
    duplicates = (
        unique
        | "DuplicateCounts" >> beam.Map(lambda u: (len(u.uris) - 1, int(u.label_conflict)))
        | "SumCounts" >> beam.CombineGlobally(lambda rows: tuple(map(sum, zip(*rows, strict=True)))
                                               if rows else (0, 0))
    )
    if statistics:
        if baseline is None and config.baseline_stats:
            baseline = stats_phase.load_baseline(config.baseline_stats)
        # {statistics, anomalies, report, transform_output, timings}, once all are written
        extras = stats_phase.add_statistics(
            pipeline, config, listing_counts, labels, unique=unique, shards=shards,
            errors=decoded[ERRORS_TAG], duplicate_counts=duplicates, baseline=baseline,
            local_runner=options.view_as(StandardOptions).runner in LOCAL_RUNNERS,
            started=started, analysis=analysis,
        )
    else:
        extras = pipeline | "NoStatistics" >> beam.Create([])

    def finalize(_, shard_infos, errors, counts, extras):
        duplicate_count, conflict_count = counts[0] if counts else (0, 0)
        manifest = manifest_lib.build_manifest(
            config, listing_counts, labels, shard_infos, errors, duplicate_count, conflict_count,
            extra=extras[0] if extras else None,
        )
        manifest_lib.write_outputs(config, manifest, errors, shard_infos)

    _ = (
        pipeline
        | "Finalize" >> beam.Create([None])
        | "WriteManifestLast" >> beam.Map(
            finalize,
            shard_infos=beam.pvalue.AsList(shards),
            errors=beam.pvalue.AsList(decoded[ERRORS_TAG]),
            counts=beam.pvalue.AsList(duplicates),
            extras=beam.pvalue.AsList(extras),
        )
    )
    return pipeline


class CheckClaimOnce(beam.DoFn):
    """Passes elements through once the output's claim is found to name `run_id`
    (checked once per DoFn instance, before the first element is decoded)."""

    def __init__(self, output: str, run_id: str | None):
        self._output, self._run_id = output, run_id

    def setup(self):
        try:
            ownership.check_still_ours(self._output, self._run_id or "")
        except ownership.ClaimLost as err:
            raise ownership.ClaimLost(
                f"this classic template's output {self._output} was claimed when the template "
                f"was built, and that claim is gone or another run's ({err}): the template has "
                "already run. Build it again, or use the Flex Template, to run again."
            ) from err

    def process(self, element):
        yield element


def _reuse_side_input(pipeline: beam.Pipeline, config: PreprocessConfig) -> dict:
    """{"reuse": sha256 -> ReuseEntry of the --reuse_from output}; {} without one.

    No empty side input when there is nothing to reuse: Beam looks a side input up for
    every element (~90 us each, 1.5 s of a 16,000-image run)."""
    if not config.reuse_from:
        return {}
    index = pipeline | "ReuseIndex" >> ReadReuseIndex(config.reuse_from, manifest_lib.INDEX_PATH)
    return {"reuse": beam.pvalue.AsDict(index)}


def check_reuse(config: PreprocessConfig) -> PreprocessConfig:
    """Drops --reuse_from when that output stored images another way (or is incomplete)."""
    if not config.reuse_from:
        return config
    try:
        earlier = manifest_lib.read_manifest(config.reuse_from)
    except FileNotFoundError as err:
        raise UsageError(f"--reuse_from: {err}") from err
    if earlier["config"]["image"] != config.to_json()["image"] or "index_path" not in earlier:
        print(f"[preprocess] {config.reuse_from} stored images with another config; "
              "decoding everything", file=sys.stderr)
        return dataclasses.replace(config, reuse_from=None)
    return config


class _OwnFailuresFilter(logging.Filter):
    """Drops Beam's logged traceback of a failure `_failed_run` tells in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _failed_run(record.exc_info[1]))


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code: 0 done, 1 the run failed
    (over --max_error_rate, no image written, its claim taken over, or a pipeline error),
    2 refused before anything was touched (usage, input, output not ours or in use)."""
    logging.getLogger().setLevel(logging.WARNING)
    beam_logger = logging.getLogger("apache_beam.runners.common")
    if not any(isinstance(f, _OwnFailuresFilter) for f in beam_logger.filters):
        beam_logger.addFilter(_OwnFailuresFilter())
    try:
        config, options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # First, so that its TensorFlow import overlaps everything below (local runs only).
    with analysis_process.started(options) as analysis:
        return _run(config, options, analysis)


def _run(config: PreprocessConfig, options: PipelineOptions, analysis: str | None) -> int:
    try:
        # Before anything is read or deleted: an output overlapping an input is refused.
        ownership.refuse_overlaps(config.output, manifest_lib.input_paths(config))
        options = dataflow.prepare(config, options)  # checks; what Dataflow workers install
        listing = list_input(config)
        config = check_reuse(config)
        baseline = (stats_phase.load_baseline(config.baseline_stats)
                    if config.baseline_stats else None)
        config = dataclasses.replace(config, run_id=ownership.new_run_id())
        claim = manifest_lib.prepare_output(
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
    ours = (manifest_lib.TooManyErrors, ownership.ClaimLost)
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


def summary(manifest: dict, elapsed_s: float) -> str:
    """The closing lines of a local run: accounting, splits and where things are."""
    accounting = manifest["accounting"]
    written = accounting["images_written"]
    splits = ", ".join(
        f"{name} {entry['num_examples']} in {len(entry['shards'])} shard(s)"
        for name, entry in manifest["splits"].items()
    )
    return "\n".join([
        f"[preprocess] done in {elapsed_s:.1f}s ({written / max(elapsed_s, 1e-9):.0f} images/s)",
        f"[preprocess] accounting: {json.dumps(accounting)}",
        f"[preprocess] splits: {splits}",
        f"[preprocess] labels: {len(manifest['labels'])}; dead letters: {manifest['errors_path']}",
        *([f"[preprocess] report: {manifest['report']}; statistics: {manifest['statistics']}; "
           f"transform: {manifest['transform_output']}; drift: "
           f"{manifest['anomalies']}"] if "report" in manifest else []),
    ])


def main() -> None:
    code = run()
    # A process that ran tf.Transform can segfault (exit 139) in the interpreter's final
    # garbage collection, after all output is written: protobuf's upb extension frees a
    # repeated-field container held in a Beam/tf.Transform reference cycle after its own
    # module state is gone (PyUpb_RepeatedContainer_Dealloc -> PyModule_GetState(NULL);
    # protocolbuffers/protobuf#22067). run() has finished every write, the manifest
    # included, and gc'd the pipeline; skip the teardown so the exit code tells the truth.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

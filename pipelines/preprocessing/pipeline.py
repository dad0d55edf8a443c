"""The preprocessing job as an unrun Beam pipeline: list, decode, dedupe, split, shard,
statistics, and the manifest written last.

`build_pipeline` returns the pipeline without running it; `pipelines.preprocess` (the
command) lists the input, claims the output and runs it. Element shapes between the steps
are listed at the top of `pipelines.preprocessing.transforms`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.cloud import dataflow
from pipelines.contract import manifest as manifest_lib
from pipelines.contract import ownership
from pipelines.preprocessing import near_duplicates
from pipelines.preprocessing import output as output_lib
from pipelines.preprocessing.after_all import AfterAll
from pipelines.preprocessing.options import (
    PreprocessConfig,
    UsageError,
    decode_processes,
    decode_threads,
    local_runner,
)
from pipelines.preprocessing.sources import Listing, list_class_folders, list_labels_csv
from pipelines.preprocessing.transforms import (
    ERRORS_TAG,
    DecodeSourceFn,
    MergeDuplicates,
    ReadReuseIndex,
    WriteShards,
)
from pipelines.stats import phase as stats_phase

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
    # bz2-compresses) a step's closure each time it builds or runs it, which grew with
    # the number of files when they captured every SourceFile.
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
                                                decode_threads(config, options),
                                                decode_processes(config, options)),
                                 **_reuse_side_input(pipeline, config))
        .with_outputs(ERRORS_TAG, main="images")
    )
    unique = decoded.images | "MergeDuplicates" >> MergeDuplicates(config)
    if config.near_duplicates == "keep_together":
        unique = unique | "KeepNearDuplicatesTogether" >> near_duplicates.KeepTogether(
            config.near_duplicate_threshold)
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
        manifest = output_lib.build_manifest(
            config, listing_counts, labels, shard_infos, errors, duplicate_count, conflict_count,
            extra=extras[0] if extras else None,
        )
        output_lib.write_outputs(config, manifest, errors, shard_infos)

    _ = pipeline | "WriteManifestLast" >> AfterAll(
        finalize,
        shard_infos=beam.pvalue.AsList(shards),
        errors=beam.pvalue.AsList(decoded[ERRORS_TAG]),
        counts=beam.pvalue.AsList(duplicates),
        extras=beam.pvalue.AsList(extras),
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
    every element, which adds up over a large run."""
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
    if earlier.config["image"] != config.to_json()["image"]:
        print(f"[preprocess] {config.reuse_from} stored images with another config; "
              "decoding everything", file=sys.stderr)
        return dataclasses.replace(config, reuse_from=None)
    return config

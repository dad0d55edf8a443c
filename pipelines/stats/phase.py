"""The statistics phase of the preprocessing pipeline: Beam wiring only.

Hangs off the PCollections `build_pipeline` already has and returns one dict, the
manifest entries it produced, which `build_pipeline` passes to the manifest as a side
input (so manifest.json is still written last):

    unique ──┬─ AggregateSplits ────────────┐
             ├─ AnalyzeTrainSplit (tft) ────┤  (local runs: in a second process)
             └─ SampleDuplicates ───────────┤
    errors ─────────────────────────── WriteStatistics (statistics.pb, anomalies.json)
    shards (after WriteShards) ─────────── WriteReport (report.html) ──> manifest extras

Only small metadata flows here: per-split aggregates (a few KB), dead letters, a
sample of duplicate groups and the shard infos; the report reads thumbnails back
from the written shards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from pipelines.contract import manifest as manifest_lib
from pipelines.contract.jsonio import write_json_atomically
from pipelines.local import analysis_process
from pipelines.preprocessing import near_duplicates
from pipelines.preprocessing import output as output_lib
from pipelines.preprocessing.after_all import AfterAll
from pipelines.preprocessing.options import PreprocessConfig, UsageError
from pipelines.preprocessing.sources import ListingCounts
from pipelines.stats import analyzers, drift, report
from pipelines.stats import feature_stats as stats_lib


def load_baseline(uri: str) -> bytes:
    """The serialized baseline statistics at `uri` (a statistics.pb, or an earlier output
    root holding stats/statistics.pb); UsageError if unreadable or not statistics."""
    try:
        inside = manifest_lib.join(uri, stats_lib.STATISTICS_PATH)
        if not uri.endswith(".pb") and FileSystems.exists(inside):
            uri = inside
    except (BeamIOError, OSError, ValueError):
        pass  # reported below, when opening `uri` itself fails
    try:
        with FileSystems.open(uri, compression_type="uncompressed") as f:
            data = f.read()
        parsed = stats_lib.parse_statistics(data)
    except (BeamIOError, OSError, ValueError) as err:
        raise UsageError(f"--baseline_stats {uri}: cannot read it ({err})") from err
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError has no common base
        raise UsageError(f"--baseline_stats {uri}: not a statistics file ({err})") from err
    if not stats_lib.split_datasets(parsed):
        raise UsageError(f"--baseline_stats {uri}: holds no split statistics")
    return data


def add_statistics(
    pipeline: beam.Pipeline,
    config: PreprocessConfig,
    listing_counts: ListingCounts,
    labels: Sequence[str],
    *,
    unique,
    shards,
    errors,
    duplicate_counts,
    baseline: bytes | None,
    local_runner: bool,
    started: float,
    analysis: str | None = None,
):
    """Adds the statistics steps; returns a PCollection of one dict of manifest entries
    {statistics, anomalies, report, transform_output, timings} (paths relative to the
    output root), complete only after every file it names is written.

    `analysis`: the token of a started `analysis_process.AnalysisProcess` to run
    tf.Transform in (local in-memory runs); None runs it inside the pipeline."""
    image = config.image
    split_names = [name for name, _ in config.splits]
    output = config.output

    aggregates = unique | "AggregateSplits" >> stats_lib.AggregateSplits(
        image.height, image.width, image.image_format.value)
    train_split = analyzers.train_split_name(split_names)
    if analysis:
        transform_output = unique | "AnalyzeTrainSplit" >> analysis_process.AnalyzeInProcess(
            analysis, output, train_split, image.height * image.width, after=shards)
    else:
        staging = (analyzers.local_staging_dir()
                   if local_runner and "://" in output else None)  # see AnalyzeTrainSplit
        transform_output = unique | "AnalyzeTrainSplit" >> analyzers.AnalyzeTrainSplit(
            output, train_split, image.height * image.width, staging)
    duplicate_sample = (
        unique
        | "DuplicateContents" >> beam.Filter(lambda u: len(u.uris) > 1)
        | "DuplicateRows" >> beam.Map(report.duplicate_row)
        # [row]: conflicts first, then by hash; a bounded sample for the report
        | "SampleDuplicates" >> beam.combiners.Top.Smallest(
            report.MAX_DUPLICATES_LISTED,
            key=lambda row: (not row["label_conflict"], row["sha256"]))
    )

    pairs = unique | "FindNearDuplicates" >> near_duplicates.FindNearDuplicates(
        config.near_duplicate_threshold)

    def write_statistics(_, aggregates, errors, pairs) -> dict:
        summary = stats_lib.summarize_dead_letters(errors, listing_counts.files_seen)
        stats = stats_lib.build_statistics(dict(aggregates), split_names, summary)
        stats_lib.add_near_duplicate_counts(stats, pairs)
        stats_lib.write_statistics(manifest_lib.join(output, stats_lib.STATISTICS_PATH), stats)
        _write_text(manifest_lib.join(output, near_duplicates.PATH),
                    "".join(pair.to_json() + "\n" for pair in pairs))
        if baseline is not None:
            found = drift.detect_drift(stats, stats_lib.parse_statistics(baseline))
        else:
            found = drift.no_baseline()
        found = {"baseline": config.baseline_stats, **found}
        write_json_atomically(manifest_lib.join(output, drift.ANOMALIES_PATH), found,
                              sort_keys=True)
        threshold = config.near_duplicate_threshold
        return {"statistics": stats.SerializeToString(), "anomalies": found,
                "near_duplicates": near_duplicates.summarize(pairs, threshold),
                # Only what the report shows: a run can have tens of thousands.
                "near_duplicates_shown": report.near_duplicates_shown(pairs),
                "statistics_written_s": time.time() - started}

    statistics = pipeline | "WriteStatistics" >> AfterAll(
        write_statistics,
        aggregates=beam.pvalue.AsList(aggregates),
        errors=beam.pvalue.AsList(errors),
        pairs=beam.pvalue.AsSingleton(pairs),
    )

    def write_report(_, written, shard_infos, errors, counts, duplicates, transform) -> dict:
        begun = time.time()
        duplicate_count, conflict_count = counts[0] if counts else (0, 0)
        entries = {
            "statistics": stats_lib.STATISTICS_PATH,
            "anomalies": drift.ANOMALIES_PATH,
            "report": report.REPORT_PATH,
            "transform_output": transform,
            "near_duplicates": written["near_duplicates"],
        }
        manifest = output_lib.build_manifest(config, listing_counts, labels, shard_infos, errors,
                                               duplicate_count, conflict_count, extra=entries)
        thumbnails = report.read_thumbnails(
            output, report.shards_in_reading_order(manifest), manifest.labels,
            per_class=report.thumbnails_per_class(len(manifest.labels)))
        timings = {
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "statistics_written_s": round(written["statistics_written_s"], 2),
            "report_started_s": round(begun - started, 2),
            "thumbnails_read_s": round(time.time() - begun, 2),
            "tf_transform_ran": "in a second process" if analysis else "in the pipeline",
        }
        page = report.render_report(
            manifest=manifest,
            statistics=stats_lib.parse_statistics(written["statistics"]),
            anomalies=written["anomalies"],
            thumbnails=thumbnails,
            errors=[json.loads(e.to_json()) for e in errors],
            duplicates=[row for sample in duplicates for row in sample],
            near_duplicates=report.near_duplicate_rows(
                output, written["near_duplicates_shown"], shard_infos),
            timings=timings,
            output=output,
        )
        report.write_report(manifest_lib.join(output, report.REPORT_PATH), page)
        timings["report_written_s"] = round(time.time() - started, 2)
        return {**entries, "timings": timings}

    return pipeline | "WriteReport" >> AfterAll(
        write_report,
        written=beam.pvalue.AsSingleton(statistics),
        shard_infos=beam.pvalue.AsList(shards),
        errors=beam.pvalue.AsList(errors),
        counts=beam.pvalue.AsList(duplicate_counts),
        duplicates=beam.pvalue.AsList(duplicate_sample),
        transform=beam.pvalue.AsSingleton(transform_output),
    )


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(text.encode())

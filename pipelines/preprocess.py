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

from pipelines import manifest as manifest_lib
from pipelines.options import PreprocessConfig, UsageError, parse_args
from pipelines.progress import ProgressPrinter
from pipelines.sources import InputError, Listing, list_class_folders, list_labels_csv
from pipelines.transforms import (
    ERRORS_TAG,
    DecodeSourceFn,
    MergeDuplicates,
    WriteShards,
)

LOCAL_RUNNERS = ("DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner")


def list_input(config: PreprocessConfig) -> Listing:
    """The files to read, from the CSV if given, else from the class folders."""
    if config.labels_csv:
        return list_labels_csv(config.labels_csv)
    return list_class_folders(config.input)


def label_vocabulary(listing: Listing) -> list[str]:
    """Sorted labels of every listed image: label id = index (stable across reruns)."""
    return sorted({label for source in listing.sources for label in source.labels})


def build_pipeline(
    config: PreprocessConfig,
    options: PipelineOptions,
    listing: Listing,
    progress_dir: str | None = None,
) -> beam.Pipeline:
    """The whole job as an unrun pipeline over `listing`, writing to `config.output`."""
    labels = label_vocabulary(listing)
    spill_dir = manifest_lib.join(config.output, f"_tmp/spill-{uuid.uuid4().hex[:8]}")
    pipeline = beam.Pipeline(options=options)
    decoded = (
        pipeline
        | "ListedFiles" >> beam.Create(listing.sources)
        # Spread files over workers before the expensive step.
        | "SpreadFiles" >> beam.Reshuffle()
        | "Decode" >> beam.ParDo(DecodeSourceFn(config.image, spill_dir, progress_dir))
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

    def finalize(_, shard_infos, errors, counts):
        duplicate_count, conflict_count = counts[0] if counts else (0, 0)
        manifest = manifest_lib.build_manifest(
            config, listing, labels, shard_infos, errors, duplicate_count, conflict_count
        )
        manifest_lib.write_outputs(config, manifest, errors)

    _ = (
        pipeline
        | "Finalize" >> beam.Create([None])
        | "WriteManifestLast" >> beam.Map(
            finalize,
            shard_infos=beam.pvalue.AsList(shards),
            errors=beam.pvalue.AsList(decoded[ERRORS_TAG]),
            counts=beam.pvalue.AsList(duplicates),
        )
    )
    return pipeline


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    logging.getLogger().setLevel(logging.WARNING)
    try:
        config, options = parse_args(sys.argv[1:] if argv is None else argv)
        listing = list_input(config)
        manifest_lib.prepare_output(config)
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    local = options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    print(f"[preprocess] {len(listing.sources)} image files, {len(listing.skipped)} skipped, "
          f"{len(label_vocabulary(listing))} labels -> {config.output}", file=sys.stderr)
    started = time.monotonic()
    with _progress(config, listing, local) as progress_dir:
        result = build_pipeline(config, options, listing, progress_dir).run()
        result.wait_until_finish()
    if not local:
        print(f"[preprocess] submitted; manifest appears at {config.output}/manifest.json "
              "when the job completes", file=sys.stderr)
        return 0
    manifest = manifest_lib.read_manifest(config.output)
    elapsed = time.monotonic() - started
    print(summary(manifest, elapsed), file=sys.stderr)
    return 0


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
    ])


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()

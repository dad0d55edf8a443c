"""The Beam pipeline of the predict job: thin steps around the pure functions.

Shape of the data between steps:
  SourceFile                            (uri, true labels) from the listing
  -> ReadFiles  -> ImageFile | DeadLetter("unreadable")     one per listed image file
  -> Predict    -> Prediction | DeadLetter(refusal reason)  RunInference, batched
  -> WritePredictions, WriteErrors                          predictions/*.jsonl, errors.jsonl
  -> Finish     summary.json, after both writes (their file names are its side inputs)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from google.api_core import exceptions as google_errors

from pipelines.contract.manifest import join
from pipelines.prediction import output, summary
from pipelines.prediction.model import ImageBytesModelHandler
from pipelines.prediction.options import PredictConfig
from pipelines.prediction.records import DeadLetter, ImageFile, Prediction
from pipelines.preprocessing.options import local_runner
from pipelines.preprocessing.sources import Listing, ListingCounts, SourceFile
from pipelines.preprocessing.transforms import is_permanent_read_error

NAMESPACE = "predict"
ERRORS_TAG = "errors"


def read_file(source: SourceFile) -> ImageFile | DeadLetter:
    """The file's bytes, or a dead letter when it cannot be read for good; transient
    read errors raise, so the runner retries the bundle."""
    try:
        with FileSystems.open(source.uri, compression_type="uncompressed") as handle:
            data = handle.read()
    except (OSError, google_errors.GoogleAPICallError) as err:
        if not is_permanent_read_error(err):
            raise
        return DeadLetter(source.uri, "unreadable", str(err)[:500])
    return ImageFile(source.uri, source.labels, hashlib.sha256(data).hexdigest(), data)


class ReadFileFn(beam.DoFn):
    """SourceFile -> ImageFile (main output) or DeadLetter (ERRORS_TAG)."""

    def process(self, source: SourceFile) -> Iterator:
        outcome = read_file(source)
        if isinstance(outcome, DeadLetter):
            Metrics.counter(NAMESPACE, "errors_unreadable").inc()
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, outcome)
        else:
            yield outcome


def _split(outcome: Prediction | DeadLetter) -> Iterator:
    if isinstance(outcome, DeadLetter):
        Metrics.counter(NAMESPACE, f"errors_{outcome.reason}").inc()
        yield beam.pvalue.TaggedOutput(ERRORS_TAG, outcome)
    else:
        Metrics.counter(NAMESPACE, "images_predicted").inc()
        yield outcome


def _finish(_, config: PredictConfig, listing: ListingCounts, labels: Sequence[str],
            labelled: bool, extra: dict, pairs, errors: int, *written) -> None:
    document = summary.build_summary(pairs, errors, listing, labels, labelled, extra)
    accounting = document["accounting"]
    problem = summary.error_budget_problem(accounting["predicted"], accounting["errors"],
                                           config.max_error_rate)
    if problem:
        # No summary.json: the output is not complete, and its claim lets a rerun take it.
        raise summary.TooManyErrors(f"{problem}; dead letters: "
                                    f"{join(config.output, output.ERRORS_PATH)}; "
                                    "no summary.json was written")
    output.finish(config.output, config.run_id, document)


def build_pipeline(config: PredictConfig, options: PipelineOptions, listing: Listing,
                   saved_model: str, labels: Sequence[str]) -> beam.Pipeline:
    """The pipeline, not yet run. `labels`: the model's, in class-id order."""
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    handler = ImageBytesModelHandler(saved_model, labels, config.batch_size)
    # SourceFile
    read = (pipeline
            | "ListedFiles" >> beam.Create(listing.sources)
            | "Spread" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(ReadFileFn()).with_outputs(ERRORS_TAG, main="files"))
    # ImageFile
    outcomes = (read.files
                | "Predict" >> RunInference(handler)
                | "SplitOutcomes" >> beam.ParDo(_split).with_outputs(ERRORS_TAG,
                                                                     main="predictions"))
    # Prediction
    predictions = outcomes.predictions
    dead = (read[ERRORS_TAG], outcomes[ERRORS_TAG]) | "DeadLetters" >> beam.Flatten()
    # DeadLetter
    written_predictions = (
        predictions
        | "PredictionRows" >> beam.Map(Prediction.to_json)
        | "WritePredictions" >> beam.io.WriteToText(
            join(config.output, output.PREDICTIONS_PREFIX), file_name_suffix=".jsonl"))
    written_errors = (
        dead
        | "ErrorRows" >> beam.Map(DeadLetter.to_json)
        | "WriteErrors" >> beam.io.WriteToText(
            join(config.output, output.ERRORS_PATH), num_shards=1, shard_name_template=""))
    # ((true labels, predicted label), files)
    pairs = (predictions
             | "TruthAndAnswer" >> beam.Map(lambda p: (p.true_labels, p.label))
             | "CountPairs" >> beam.combiners.Count.PerElement()
             | "AllPairs" >> beam.combiners.ToList())
    errors = dead | "CountErrors" >> beam.combiners.Count.Globally()
    extra = {"run_id": config.run_id, "model": saved_model, "config": config.to_json(),
             "predictions_path": output.PREDICTIONS_PREFIX + "-*.jsonl",
             "errors_path": output.ERRORS_PATH}
    _ = (pipeline
         | "Start" >> beam.Create([None])
         | "Finish" >> beam.Map(
             # Both listings carry true labels: class folders and the CSV.
             _finish, config, listing.counts(), tuple(labels), True, extra,
             beam.pvalue.AsSingleton(pairs), beam.pvalue.AsSingleton(errors),
             beam.pvalue.AsList(written_predictions), beam.pvalue.AsList(written_errors)))
    return pipeline

"""The predict command: resolve the model, list the input, claim the output, run the
pipeline, print the summary. Exit codes in `run`'s docstring."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.cloud import access
from pipelines.contract import ownership
from pipelines.contract.errors import UsageError
from pipelines.prediction import model as model_lib
from pipelines.prediction import output, summary
from pipelines.prediction.options import PredictConfig, parse_args
from pipelines.prediction.pipeline import build_pipeline
from pipelines.preprocessing.sources import (
    InputError,
    Listing,
    list_class_folders,
    list_labels_csv,
)


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code: 0 done, 1 the run failed (dead
    letters over --max_error_rate, its claim taken over, or a pipeline error), 2 refused
    before anything was touched (usage, model or input missing, output overlapping an
    input, not ours or in use)."""
    logging.getLogger().setLevel(logging.WARNING)
    try:
        config, options = parse_args(sys.argv[1:] if argv is None else argv)
        # Before the model or input is read: one line, not minutes of client retries.
        access.preflight(access.cloud_use(
            [*input_paths(config).values(), config.output],
            dataflow_endpoint=access.dataflow_endpoint(options)))
        ownership.refuse_overlaps(config.output, input_paths(config))
        saved_model = model_lib.resolve_model(config.model)
        ownership.refuse_overlaps(config.output, {"--model (its SavedModel)": saved_model})
        listing = list_input(config)
        _, signature = model_lib.load_signature(saved_model)
        labels = model_lib.model_labels(signature)
        config = dataclasses.replace(config, run_id=ownership.new_run_id())
        claim = output.claim_output(config.output, config.overwrite, config.run_id)
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run_claimed(config, options, listing, saved_model, labels)
    except Exception as err:
        # Beam re-raises a step's error wrapped, its text carrying the original's name.
        text = f"{type(err).__name__}: {err}"
        for ours in (ownership.ClaimLost, summary.TooManyErrors):
            if f"{ours.__name__}: " in text:
                message = text.rsplit(f"{ours.__name__}: ", 1)[1]
                print(f"error: {message.split(' [while running', 1)[0].splitlines()[0]}",
                      file=sys.stderr)
                return 1
        raise
    finally:
        claim.release()


def input_paths(config: PredictConfig) -> dict[str, str | None]:
    """{flag: path} of what the run reads, which the output may not overlap."""
    csv_folder = None
    if config.labels_csv:
        csv_folder = config.labels_csv.rsplit("/", 1)[0] if "/" in config.labels_csv else "."
    return {"--input": config.input, "--labels (its folder)": csv_folder,
            "--model": config.model}


def list_input(config: PredictConfig) -> Listing:
    if config.input:
        return list_class_folders(config.input)
    return list_labels_csv(config.labels_csv)


def _run_claimed(config: PredictConfig, options: PipelineOptions, listing: Listing,
                 saved_model: str, labels: tuple[str, ...]) -> int:
    print(f"[predict] {len(listing.sources)} image files, {len(listing.skipped)} skipped, "
          f"model {saved_model} ({len(labels)} labels) -> {config.output}", file=sys.stderr)
    started = time.monotonic()
    build_pipeline(config, options, listing, saved_model, labels).run().wait_until_finish()
    if options.view_as(StandardOptions).runner not in ("DirectRunner", "direct"):
        return 0  # the summary is in the bucket; nothing more to say from here
    with output.open_summary(config.output) as handle:
        document = json.load(handle)
    elapsed = time.monotonic() - started
    accounting = document["accounting"]
    print(f"[predict] done in {elapsed:.1f}s "
          f"({accounting['predicted'] / max(elapsed, 1e-9):.0f} images/s); accounting: "
          f"{json.dumps(accounting)}", file=sys.stderr)
    evaluation = document.get("evaluation") or {}
    if evaluation.get("accuracy") is not None:
        print(f"[predict] accuracy {evaluation['accuracy']:.4f} on {evaluation['evaluated']} "
              "labelled files", file=sys.stderr)
    return 0

"""Command-line options of the predict job, parsed into a frozen config.

Our flags go to `PredictConfig`; every other flag must be a Beam pipeline option (the
same runner and cloud flags as preprocess) and goes to `PipelineOptions` untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.contract.command import prog
from pipelines.contract.errors import UsageError
from pipelines.preprocessing.options import (
    DEFAULT_MAX_ERROR_RATE,
    _reject_unknown_beam_flags,
    beam_options,
    refuse_glob_characters,
)

DEFAULT_BATCH_SIZE = 64
# top_k lists this many classes (fewer when the model has fewer).
TOP_K = 5


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Everything the pipeline needs to know, fixed before it is built."""

    model: str  # as given: a SavedModel folder or a retraining root's current.json
    output: str
    input: str | None = None
    labels_csv: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    overwrite: bool = False
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # dead letters / image files, at most
    run_id: str | None = None  # the output claim's id; set by the command

    def to_json(self) -> dict:
        return {"model": self.model, "input": self.input, "labels_csv": self.labels_csv,
                "batch_size": self.batch_size, "max_error_rate": self.max_error_rate}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pipelines.predict"),
        description="Classify image files (a folder or gs:// prefix, or a uri,label CSV) "
        "with a SavedModel; writes predictions/*.jsonl, errors/errors.jsonl and "
        "summary.json (last). Flags not listed here are passed to Beam.")
    parser.add_argument("--model", required=True,
                        help="SavedModel folder, or a retraining root's current.json")
    parser.add_argument("--input", help="folder or gs:// prefix (class folders give each "
                        "file a true label; files directly under it are skipped, as in "
                        "preprocess)")
    parser.add_argument("--labels", dest="labels_csv", help="CSV of uri,label rows")
    parser.add_argument("--output", required=True, help="output folder or gs:// prefix")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per call of the model (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete earlier prediction output at --output")
    parser.add_argument("--max_error_rate", type=float, default=DEFAULT_MAX_ERROR_RATE,
                        help="largest fraction of image files that may become dead letters; "
                        "above it the run fails and writes no summary.json (default "
                        f"{DEFAULT_MAX_ERROR_RATE:g}, as preprocess; 0 = any dead letter fails)")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[PredictConfig, PipelineOptions]:
    """Splits argv into our config and Beam's options. Raises UsageError."""
    known, beam_args = _parser().parse_known_args(list(argv))
    _reject_unknown_beam_flags(beam_args)
    refuse_glob_characters("--output", known.output)
    if bool(known.input) == bool(known.labels_csv):
        raise UsageError("give either --input (a folder or gs:// prefix) or --labels (a CSV)")
    if known.batch_size < 1:
        raise UsageError("--batch_size must be at least 1")
    if not 0 <= known.max_error_rate <= 1:
        raise UsageError("--max_error_rate must be in 0..1")
    config = PredictConfig(
        model=known.model.rstrip("/"),
        output=known.output.rstrip("/"),
        input=known.input.rstrip("/") if known.input else None,
        labels_csv=known.labels_csv,
        batch_size=known.batch_size,
        overwrite=known.overwrite,
        max_error_rate=known.max_error_rate,
    )
    return config, beam_options(beam_args)

"""summary.json: the accounting of a predict run and, when the input carries labels,
how the model did against them. Pure functions over small counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from pipelines.contract import error_budget
from pipelines.contract.error_budget import TooManyErrors  # noqa: F401 - raised by callers
from pipelines.preprocessing.sources import ListingCounts

TOOL = "imagebeam"
KIND = "predictions"
FORMAT_VERSION = 1

# ((true labels, predicted label), number of files)
PairCount = tuple[tuple[tuple[str, ...], str], int]


class AccountingMismatch(RuntimeError):
    """Some listed file is neither predicted, a dead letter nor skipped."""


def error_budget_problem(predicted: int, errors: int, max_error_rate: float) -> str | None:
    """Why a run with these counts failed, or None: preprocess's rule
    (`pipelines.contract.error_budget`) with predicted files in the place of written
    images. Skipped files (not image names) do not count."""
    return error_budget.error_budget_problem(predicted + errors, errors, predicted,
                                             max_error_rate, produced_as="predicted")


def accounting(listing: ListingCounts, predicted: int, errors: int) -> dict:
    """{files_seen, predicted, errors, skipped, hidden_ignored}; raises AccountingMismatch
    unless files_seen == predicted + errors + skipped."""
    counts = {"files_seen": listing.files_seen, "predicted": predicted, "errors": errors,
              "skipped": len(listing.skipped), "hidden_ignored": listing.hidden}
    if predicted + errors + len(listing.skipped) != listing.files_seen:
        raise AccountingMismatch(f"accounting mismatch: {counts}")
    return counts


def evaluation(pairs: Iterable[PairCount], labels: Sequence[str]) -> dict:
    """Accuracy, per-class recall and the confusion matrix of the files with exactly one
    true label that the model knows. Rows are true labels, columns predicted ones, both
    in the model's label order. Files whose true label the model does not know are
    counted per label in `unknown_true_labels`; files with several true labels (a CSV
    may give several) in `multi_labelled`; neither is in the accuracy."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    unknown: Counter[str] = Counter()
    multi = 0
    for (truth, predicted), count in pairs:
        if len(truth) != 1:
            multi += count
        elif truth[0] not in index:
            unknown[truth[0]] += count
        else:
            matrix[index[truth[0]]][index[predicted]] += count
    evaluated = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {
        "evaluated": evaluated,
        "accuracy": correct / evaluated if evaluated else None,
        "per_class": {label: {"files": sum(matrix[i]),
                              "recall": matrix[i][i] / sum(matrix[i]) if sum(matrix[i]) else None}
                      for i, label in enumerate(labels)},
        "confusion_matrix": {"labels": list(labels), "rows": matrix},
        "unknown_true_labels": dict(sorted(unknown.items())),
        "multi_labelled": multi,
    }


def build_summary(pairs: Sequence[PairCount], errors: int, listing: ListingCounts,
                  labels: Sequence[str], labelled: bool, extra: dict) -> dict:
    """The summary.json document; raises AccountingMismatch (see `accounting`)."""
    predicted_labels = Counter({label: 0 for label in labels})
    for (_, predicted), count in pairs:
        predicted_labels[predicted] += count
    summary = {
        "tool": TOOL, "kind": KIND, "format_version": FORMAT_VERSION, **extra,
        "labels": list(labels),
        "accounting": accounting(listing, sum(count for _, count in pairs), errors),
        "predicted_labels": dict(predicted_labels),
        "skipped": [{"uri": s.uri, "reason": s.reason} for s in listing.skipped],
    }
    if labelled:
        summary["evaluation"] = evaluation(pairs, labels)
    return summary


def is_ours(summary: object) -> bool:
    """Whether a parsed summary.json was written by this tool's predict command."""
    return (isinstance(summary, dict) and summary.get("tool") == TOOL
            and summary.get("kind") == KIND and summary.get("format_version") == FORMAT_VERSION
            and isinstance(summary.get("entries"), list)
            and all(isinstance(name, str) for name in summary["entries"]))

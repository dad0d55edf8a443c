"""`model_dir/report.html`: one self-contained page about a training run.

Sections (SECTIONS): summary, learning curves, confusion matrix, per-class metrics, the
most confidently wrong test images (thumbnails with predicted and true label), the
config, timings and input images/s. Charts and the page frame come from
`pipelines.contract.html_page` (shared with the preprocessing report); images are inline
data URIs, so the file opens offline.

`render` is pure (metrics.json's dict, the config and the wrong images in; a string
out); `confidently_wrong` picks the images from predictions; `write` stores the page.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from pipelines.contract import html_page as h

PATH = "report.html"  # in model_dir
MAX_WRONG = 24
THUMBNAIL_SIDE = 96  # pixels, longest side
SECTIONS = (
    ("summary", "Summary"),
    ("curves", "Learning curves"),
    ("confusion", "Confusion matrix"),
    ("per_class", "Per-class metrics"),
    ("wrong", "Most confidently wrong"),
    ("config", "Config"),
    ("timings", "Timings and input images/s"),
)


@dataclasses.dataclass(frozen=True)
class Wrong:
    """A test image the model got wrong, with its confidence in the wrong label."""

    image: np.ndarray  # uint8 [H, W, 3]: the stored pixels, what the model saw
    true: str
    predicted: str
    confidence: float


def confidently_wrong(probabilities: np.ndarray, labels: np.ndarray,
                      limit: int = MAX_WRONG) -> list[int]:
    """Indices of the wrongly predicted examples, most confident first (ties: first
    index first), at most `limit`. probabilities float [N, K], labels int [N]."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:limit]]


def render(metrics: Mapping, config: Mapping, wrong: Sequence[Wrong]) -> str:
    """The page. metrics: what metrics.json holds; config: the run's TrainConfig as a
    dict; wrong: the test images `confidently_wrong` picked."""
    labels = list(metrics.get("labels", []))
    body = [
        h.section("summary", "Summary", _summary(metrics)),
        h.section("curves", "Learning curves", _curves(metrics.get("history", []),
                                                       metrics.get("best_epoch"))),
        h.section("confusion", "Confusion matrix", "".join(
            f"<h3>{split}</h3>{_confusion(metrics[split]['confusion_matrix'], labels)}"
            for split in ("test", "validation") if split in metrics) or _none()),
        h.section("per_class", "Per-class metrics", "".join(
            f"<h3>{split}</h3>{_per_class(metrics[split]['per_class'])}"
            for split in ("test", "validation") if split in metrics) or _none()),
        h.section("wrong", "Most confidently wrong", _wrong(wrong)),
        h.section("config", "Config", "<pre>" + h.escape(json.dumps(
            dict(config), indent=2, sort_keys=True, default=str)) + "</pre>"),
        h.section("timings", "Timings and input images/s", _timings(metrics)),
    ]
    return h.page(f"Training report: {metrics.get('model', '')}", "Training report",
                  h.escape(f"{metrics.get('model', '')} on {metrics.get('data', '')} → "
                           f"{metrics.get('saved_model', '')}"), SECTIONS, body)


def write(path: str, page: str) -> None:
    """Writes the page to `path` (local or gs://), whole or not at all."""
    import tensorflow as tf  # the trainer's file system layer (gs:// included)

    temporary = f"{path}.tmp"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(page)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def _none() -> str:
    return '<p class="muted">no validation or test split</p>'


def _card(title: str, value, bad: bool = False) -> str:
    return (f'<div class="card{" bad" if bad else ""}"><div class="muted">{h.escape(title)}'
            f'</div><div class="big">{h.escape(value)}</div></div>')


def _summary(metrics: Mapping) -> str:
    def accuracy(split):
        value = (metrics.get(split) or {}).get("accuracy")
        return "–" if value is None else f"{value:.3f}"
    cards = [
        _card("test accuracy", accuracy("test")),
        _card("validation accuracy", accuracy("validation")),
        _card("epochs trained", metrics.get("epochs", "–")),
        _card("best epoch (val loss)", metrics.get("best_epoch") or "–"),
        _card("exported epoch", metrics.get("exported_epoch", "–")),
        _card("input images/s", metrics.get("input_images_per_s") or "–"),
        _card("classes", len(metrics.get("labels", []))),
    ]
    warnings = "".join(f'<p class="bad-text">{h.escape(w)}</p>'
                       for w in metrics.get("warnings", []))
    return f'<div class="cards">{"".join(cards)}</div>{warnings}'


def _curves(history: Sequence[Mapping], best: int | None) -> str:
    if not history:
        return '<p class="muted">no epochs trained in this run</p>'
    epochs = [row["epoch"] for row in history]

    def series(*keys):
        return {key: [row.get(key) for row in history] for key in keys
                if any(key in row for row in history)}
    note = (f'<p class="muted">Best validation loss at epoch {best}.</p>' if best else "")
    return ('<div class="grid2"><figure class="chart">'
            + h.line_chart(epochs, series("loss", "val_loss"), "epoch", "loss")
            + '<figcaption>loss (train: with augmentation)</figcaption></figure>'
            '<figure class="chart">'
            + h.line_chart(epochs, series("accuracy", "val_accuracy"), "epoch", "accuracy")
            + "<figcaption>accuracy</figcaption></figure></div>" + note)


def _confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """Rows: true label; columns: predicted; each cell shaded by its share of the row."""
    head = "".join(f"<th>{h.escape(h.clip(label, 14))}</th>" for label in labels)
    rows = []
    for label, row in zip(labels, matrix, strict=True):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = count / total
            colour = "89,161,79" if labels[j] == label else "225,87,89"
            cells.append(f'<td class="num" style="background:rgba({colour},{share:.2f})">'
                         f"{count}</td>")
        rows.append(f"<tr><th>{h.escape(label)}</th>{''.join(cells)}</tr>")
    return ('<p class="muted">Rows: true label; columns: predicted.</p>'
            f"<table><thead><tr><th>true \\ predicted</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _per_class(per_class: Mapping[str, Mapping]) -> str:
    rows = [(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
             m["support"]) for label, m in per_class.items()]
    return h.table(("label", "precision", "recall", "f1", "support"), rows, (1, 2, 3, 4))


def _wrong(wrong: Sequence[Wrong]) -> str:
    if not wrong:
        return '<p class="muted">no wrongly predicted test images</p>'
    figures = "".join(
        f'<figure><img src="{h.image_data_uri(Image.fromarray(w.image), THUMBNAIL_SIDE)}" '
        f'width="{THUMBNAIL_SIDE}" alt="{h.escape(w.true)}" style="border-color:#e15759">'
        f"<figcaption>predicted <b>{h.escape(w.predicted)}</b> ({w.confidence:.2f})<br>"
        f"true {h.escape(w.true)}</figcaption></figure>" for w in wrong)
    return ('<p class="muted">Test images, the stored pixels the model saw, ordered by the '
            f'probability it gave the wrong label.</p><div class="thumbs">{figures}</div>')


def _timings(metrics: Mapping) -> str:
    timings = metrics.get("timings", {})
    rows = [(name, value) for name, value in timings.items()]
    per_epoch = [(row["epoch"], row.get("train_seconds"), row.get("images_per_s"),
                  row.get("peak_rss_mb")) for row in metrics.get("history", [])]
    return (h.table(("step", "seconds"), rows, (1,))
            + f'<p>Input images/s (steady epochs): <b>{metrics.get("input_images_per_s")}'
            "</b></p>"
            + h.table(("epoch", "train seconds", "images/s", "peak RSS MB"), per_epoch,
                      (1, 2, 3)))

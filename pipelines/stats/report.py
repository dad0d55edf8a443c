"""`stats/report.html`: one self-contained page a person reads after a run.

A page of `pipelines.contract.html_page` (inline SVG charts, thumbnails as data URIs,
no scripts or external URLs). Sections:
summary, examples per class per split, original sizes and bytes per image, source
formats, shard sizes, thumbnails per class (decoded from the WRITTEN shards: what the
model will see), dead letters, duplicates and label conflicts, drift, config and
timings.

`render_report` is pure (dicts and the statistics proto in, a string out);
`read_thumbnails` reads shards through Beam's FileSystems (local or gs://, emulator
included), never through TensorFlow's file systems.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipelines.contract import html_page, records
from pipelines.contract.html_page import (
    SERIES_COLOURS,
    clip,
    column_chart,
    grouped_bar_chart,
    histogram_chart,
    image_data_uri,
    section,
    table,
)
from pipelines.contract.html_page import compact_number as _fmt
from pipelines.contract.html_page import escape as _e
from pipelines.contract.manifest import Manifest
from pipelines.stats import feature_stats as stats_lib

REPORT_PATH = "stats/report.html"  # relative to the output root
THUMBNAILS_PER_CLASS = 8
THUMBNAILS_IN_ALL = 1200  # ~3 KB each: with many classes, fewer per class (at least 2)
THUMBNAIL_SIDE = 96  # longest side in the page, pixels
THUMBNAIL_READ_BUDGET = 256 << 20  # bytes of shards read looking for thumbnails
MAX_CLASSES_CHARTED = 60
MAX_TABLE_ROWS = 200
MAX_DUPLICATES_LISTED = 300  # contents; the pipeline passes at most this many
MAX_NEAR_DUPLICATES_SHOWN = 60  # anomalous pairs with thumbnails

SPLIT_COLOURS = SERIES_COLOURS
SECTIONS = (
    ("summary", "Summary"),
    ("classes", "Examples per class"),
    ("sizes", "Original sizes and bytes"),
    ("formats", "Source formats"),
    ("shards", "Shards"),
    ("thumbnails", "Thumbnails from the shards"),
    ("dead-letters", "Dead letters"),
    ("duplicates", "Duplicates and label conflicts"),
    ("near-duplicates", "Near-duplicates across splits or labels"),
    ("drift", "Drift"),
    ("config", "Config and timings"),
)


@dataclasses.dataclass(frozen=True)
class Thumbnail:
    """One record's image, small, as the page shows it."""

    data_uri: str  # data:image/jpeg;base64,...
    split: str
    source: str  # first source uri


# --- thumbnails from the shards ---------------------------------------------------------


def thumbnails_per_class(num_labels: int) -> int:
    """8 per class, fewer when there are many classes, so the page stays a few MB."""
    return max(2, min(THUMBNAILS_PER_CLASS, THUMBNAILS_IN_ALL // max(num_labels, 1)))


def read_thumbnails(
    root: str,
    shards: Sequence[tuple[str, str]],
    labels: Sequence[str],
    per_class: int = THUMBNAILS_PER_CLASS,
    budget_bytes: int = THUMBNAIL_READ_BUDGET,
) -> dict[str, list[Thumbnail]]:
    """Up to `per_class` thumbnails per label, decoded from the written shards.

    Args:
      root: the output root (local or gs://).
      shards: (split, path relative to root) in reading order. Records within a
        shard are shuffled, so the first records of a shard are a sample of it.
      labels: every label; each gets a (possibly empty) list.
      budget_bytes: stop reading after this many shard bytes, full or not.
    Returns:
      {label: [Thumbnail]}; a multi-label image appears under each of its labels.
    """
    wanted = {label: per_class for label in labels}
    found: dict[str, list[Thumbnail]] = {label: [] for label in labels}
    spent = 0
    for split, relative in shards:
        if not any(wanted.values()) or spent >= budget_bytes:
            break
        path = FileSystems.join(root, *relative.split("/"))
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for record in records.read_records(handle):
                if not any(wanted.values()) or spent >= budget_bytes:
                    break
                spent += len(record) + 16
                example = _parse(record)
                needing = [t for t in example["labels"] if wanted.get(t, 0) > 0]
                if not needing:
                    continue
                thumbnail = Thumbnail(_thumbnail_uri(example), split, example["source"])
                for label in needing:
                    found[label].append(thumbnail)
                    wanted[label] -= 1
    return found


def _parse(record: bytes) -> dict:
    features = records.parse_example(record)
    return {
        "encoded": features[records.ENCODED][0],
        "format": features[records.FORMAT][0].decode(),
        "height": features[records.HEIGHT][0],
        "width": features[records.WIDTH][0],
        "labels": [v.decode() for v in features.get(records.LABEL_TEXT, [])],
        "source": (features.get(records.SOURCE_ID) or [b""])[0].decode(),
    }


def _thumbnail_uri(example: Mapping) -> str:
    if example["format"] == "raw":
        pixels = np.frombuffer(example["encoded"], dtype=np.uint8).reshape(
            example["height"], example["width"], 3)
        image = Image.fromarray(pixels)
    else:
        image = Image.open(io.BytesIO(example["encoded"]))
    return image_data_uri(image, THUMBNAIL_SIDE)


# --- the page ----------------------------------------------------------------------------


def render_report(
    *,
    manifest: Manifest,
    statistics,
    anomalies: Mapping,
    thumbnails: Mapping[str, Sequence[Thumbnail]],
    errors: Sequence[Mapping],
    duplicates: Sequence[Mapping],
    timings: Mapping,
    output: str = "",
    near_duplicates: Sequence[Mapping] = (),
) -> str:
    """The whole page as one HTML string.

    Args:
      manifest: the run's manifest (as manifest.json will hold it).
      statistics: the run's DatasetFeatureStatisticsList.
      anomalies: what anomalies.json holds (`baseline` uri or None, `anomalies`, ...).
      thumbnails: {label: [Thumbnail]} from `read_thumbnails`.
      errors: dead letters as dicts (uri, reason, stage, detail).
      duplicates: contents seen under several uris, as dicts (sha256, uris, labels,
        label_conflict); possibly a sample, the counts are in the manifest.
      near_duplicates: near-duplicate pairs across splits or labels, from
        `near_duplicate_rows` (with thumbnails).
      timings: {name: seconds or text}.
      output: the output root, for the header.
    """
    splits = list(manifest.splits)
    colours = {name: SPLIT_COLOURS[i % len(SPLIT_COLOURS)] for i, name in enumerate(splits)}
    body = [
        _summary(manifest, statistics, anomalies),
        _classes(manifest, colours),
        _sizes(statistics),
        _formats(statistics, splits, colours),
        _shards(manifest, colours),
        _thumbnails(manifest, thumbnails, colours),
        _dead_letters(manifest, errors),
        _duplicates(manifest, duplicates),
        _near_duplicates(manifest, near_duplicates),
        _drift(anomalies),
        _config(manifest, timings),
    ]
    return html_page.page(
        title=f"Preprocessing report: {manifest.input or ''}",
        heading="Preprocessing report",
        subtitle=f"{_e(manifest.input)} &rarr; {_e(output)}",
        sections=SECTIONS, body=body)


def _section(key: str, content: str) -> str:
    return section(key, dict(SECTIONS)[key], content)


def _summary(manifest, statistics, anomalies) -> str:
    accounting = manifest.accounting
    found = anomalies.get("anomalies", [])
    cards = [
        ("images written", accounting.images_written, ""),
        ("files seen", accounting.files_seen, ""),
        ("labels", len(manifest.labels), ""),
        ("dead letters", accounting.errors, "bad" if accounting.errors else ""),
        ("duplicates", accounting.duplicates, ""),
        ("label conflicts", accounting.label_conflicts,
         "bad" if accounting.label_conflicts else ""),
        ("drift anomalies", len(found) if anomalies.get("baseline") else "no baseline",
         "bad" if found else ""),
    ]
    card_html = "".join(f'<div class="card {cls}"><div class="big">{_e(value)}</div>'
                        f'<div class="muted">{_e(name)}</div></div>'
                        for name, value, cls in cards)
    image = manifest.image
    rows = []
    for name, dataset in stats_lib.split_datasets(statistics).items():
        encoded = stats_lib.find_feature(dataset, stats_lib.ENCODED)
        means = stds = ["", "", ""]
        if encoded is not None:
            means = [f"{stats_lib.custom_stat(encoded, f'pixel_mean/{c}'):.2f}"
                     for c in stats_lib.CHANNELS]
            stds = [f"{stats_lib.custom_stat(encoded, f'pixel_std/{c}'):.2f}"
                    for c in stats_lib.CHANNELS]
        rows.append((name, dataset.num_examples, len(manifest.shard_paths(name)),
                     " / ".join(means), " / ".join(stds)))
    return _section("summary", (
        f'<div class="cards">{card_html}</div>'
        f"<p>Stored as <b>{_e(image.format)}</b>, {image.height}&times;{image.width}"
        f" pixels, resize <b>{_e(image.resize)}</b>. Accounting: files seen = written + "
        "duplicates + dead letters + skipped. Pixel mean/std are per channel (R / G / B) "
        "over the stored 0..255 pixels; the train split's are what "
        "<code>transform_output</code> carries into the model.</p>"
        + table(["split", "examples", "shards", "pixel mean R / G / B",
                  "pixel std R / G / B"], rows, numeric=(1, 2))
        + f'<p class="muted">accounting: {_e(json.dumps(dataclasses.asdict(accounting)))}</p>'
    ))


def _classes(manifest, colours) -> str:
    labels = list(manifest.labels)
    counts = {split: entry.class_counts for split, entry in manifest.splits.items()}
    totals = Counter({label: sum(c.get(label, 0) for c in counts.values()) for label in labels})
    shown = [label for label, _ in totals.most_common(MAX_CLASSES_CHARTED)]
    note = ""
    if len(labels) > len(shown):
        note = (f'<p class="muted">The {len(shown)} largest of {len(labels)} classes are '
                "charted; the table lists all.</p>")
    shown.sort()
    chart = grouped_bar_chart(
        shown, {split: [c.get(label, 0) for label in shown] for split, c in counts.items()},
        colours, "examples per class")
    rows = [(label, *(counts[s].get(label, 0) for s in counts), totals[label])
            for label in labels]
    listed = table(["label", *counts, "total"], rows, numeric=range(1, len(counts) + 2))
    return _section("classes", f'<div class="chart">{chart}</div>{note}'
                               f"<details><summary>table</summary>{listed}</details>")


def _sizes(statistics) -> str:
    from pipelines.stats import drift  # pooled histograms live with the drift checks

    charts = []
    for path, label in ((stats_lib.ORIGINAL_HEIGHT, "original height (px)"),
                        (stats_lib.ORIGINAL_WIDTH, "original width (px)"),
                        (stats_lib.SOURCE_BYTES, "source file bytes"),
                        (stats_lib.STORED_BYTES, "stored bytes per image")):
        buckets = drift.pooled_histogram(statistics, path)
        charts.append(f'<figure>{histogram_chart(buckets, label)}'
                      f"<figcaption>{_e(label)}, all splits</figcaption></figure>")
    rows = []
    for name, dataset in stats_lib.split_datasets(statistics).items():
        for path in (stats_lib.ORIGINAL_HEIGHT, stats_lib.ORIGINAL_WIDTH,
                     stats_lib.STORED_BYTES, stats_lib.SOURCE_BYTES):
            feature = stats_lib.find_feature(dataset, path)
            if feature is None:
                continue
            s = feature.num_stats
            rows.append((name, path, _fmt(s.min), _fmt(s.median), _fmt(s.mean), _fmt(s.max)))
    return _section("sizes", (
        '<p class="muted">Buckets are log-scale (4 per doubling).</p>'
        f'<div class="grid2">{"".join(charts)}</div>'
        + table(["split", "feature", "min", "median", "mean", "max"], rows,
                 numeric=(2, 3, 4, 5))
    ))


def _formats(statistics, splits, colours) -> str:
    datasets = stats_lib.split_datasets(statistics)
    per_split = {s: stats_lib.value_counts(datasets[s], stats_lib.SOURCE_FORMAT)
                 for s in splits if s in datasets}
    formats = sorted({f for counts in per_split.values() for f in counts})
    if not formats:
        return _section("formats", '<p class="muted">no images</p>')
    chart = grouped_bar_chart(
        formats, {s: [c.get(f, 0) for f in formats] for s, c in per_split.items()},
        colours, "source formats")
    return _section("formats", f'<div class="chart">{chart}</div>')


def _shards(manifest, colours) -> str:
    items, rows = [], []
    for split, entry in manifest.splits.items():
        for shard in entry.shards:
            items.append((shard.path, shard.num_bytes / 1e6, colours[split]))
            rows.append((shard.path, split, shard.num_examples,
                         f"{shard.num_bytes / 1e6:.2f}"))
    legend = " ".join(f'<span class="swatch" style="background:{colours[s]}"></span>{_e(s)}'
                      for s in manifest.splits)
    listed = table(["shard", "split", "examples", "MB"], rows[:MAX_TABLE_ROWS], numeric=(2, 3))
    return _section("shards", (
        f"<p>{len(rows)} shard(s). {legend}</p>"
        f'<div class="chart">{column_chart(items, "MB per shard")}</div>'
        f"<details><summary>table</summary>{listed}</details>"
    ))


def _thumbnails(manifest, thumbnails, colours) -> str:
    rows = []
    for label in manifest.labels:
        found = thumbnails.get(label, [])
        cells = "".join(
            f'<img src="{t.data_uri}" alt="{_e(label)}" title="{_e(t.split)}: {_e(t.source)}" '
            f'style="border-color:{colours.get(t.split, "#999")}">' for t in found
        ) or '<span class="muted">none found in the shards read</span>'
        rows.append(f'<div class="thumbrow"><div class="thumblabel">{_e(label)}</div>'
                    f'<div class="thumbs">{cells}</div></div>')
    legend = " ".join(f'<span class="swatch" style="background:{c}"></span>{_e(s)}'
                      for s, c in colours.items())
    return _section("thumbnails", (
        f'<p class="muted">Decoded from the written shards, resized to at most '
        f"{THUMBNAIL_SIDE}px for this page; border = split ({legend}). Hover for the "
        "source.</p>" + "".join(rows)
    ))


def _dead_letters(manifest, errors) -> str:
    if not errors:
        return _section("dead-letters", "<p>No dead letters: every image file decoded.</p>")
    reasons = Counter(e["reason"] for e in errors)
    chart = grouped_bar_chart(sorted(reasons), {"files": [reasons[r] for r in sorted(reasons)]},
                              {"files": "#e15759"}, "dead letters by reason")
    ordered = sorted(errors, key=lambda e: (e["reason"], e["uri"]))
    rows = [(e["uri"], e["reason"], e["stage"], clip(e.get("detail", ""), 160))
            for e in ordered[:MAX_TABLE_ROWS]]
    more = (f'<p class="muted">first {MAX_TABLE_ROWS} of {len(errors)}; all are in '
            f"{_e(manifest.errors_path)}</p>" if len(errors) > MAX_TABLE_ROWS else "")
    return _section("dead-letters", (
        f"<p>{len(errors)} file(s) could not become records "
        f"(<code>{_e(manifest.errors_path)}</code>).</p>"
        f'<div class="chart">{chart}</div>'
        + table(["uri", "reason", "stage", "detail"], rows) + more
    ))


def _duplicates(manifest, duplicates) -> str:
    accounting = manifest.accounting
    if not duplicates:
        return _section("duplicates", "<p>No duplicate contents.</p>")
    conflicts = [d for d in duplicates if d["label_conflict"]]
    plain = [d for d in duplicates if not d["label_conflict"]]
    parts = [f"<p>{accounting.duplicates} duplicate file(s) merged into the record of "
             f"their content; {accounting.label_conflicts} content(s) carry conflicting "
             "labels (identical bytes in different class folders: the record keeps every "
             "label).</p>"]
    if conflicts:
        parts.append("<h3>Label conflicts</h3>" + table(
            ["sha256", "labels", "uris"],
            [(d["sha256"][:12], ", ".join(d["labels"]), "\n".join(d["uris"]))
             for d in conflicts]))
    if plain:
        parts.append("<h3>Duplicates</h3>" + table(
            ["sha256", "labels", "uris"],
            [(d["sha256"][:12], ", ".join(d["labels"]), "\n".join(d["uris"])) for d in plain]))
    if len(duplicates) >= MAX_DUPLICATES_LISTED:
        parts.append(f'<p class="muted">the first {len(duplicates)} contents (label conflicts '
                     "first) are listed.</p>")
    return _section("duplicates", "".join(parts))


def near_duplicates_shown(pairs: Iterable) -> list:
    """The pairs the report shows: the first MAX_NEAR_DUPLICATES_SHOWN of those across
    splits or labels, leakage first, then by distance."""
    anomalous = [p for p in pairs if p.across_splits or p.across_labels]
    anomalous.sort(key=lambda p: (not p.across_splits, p.distance, p.sha256_a, p.sha256_b))
    return anomalous[:MAX_NEAR_DUPLICATES_SHOWN]


def near_duplicate_rows(root: str, pairs: Sequence, shard_infos: Sequence
                        ) -> list[dict]:
    """`near_duplicates_shown` of `pairs`, each with both images' thumbnails, read from the
    written shards where the shards' index lines place them."""
    pairs = near_duplicates_shown(pairs)
    if not pairs:
        return []  # nothing to show: the shards' index lines need not be parsed
    wanted = {sha for pair in pairs for sha in (pair.sha256_a, pair.sha256_b)}
    places = {}
    for shard in shard_infos:
        for line in shard.index_lines.splitlines():
            row = json.loads(line)
            if row["sha256"] in wanted:
                places[row["sha256"]] = row
    images = {sha: _stored_thumbnail(root, places[sha]) for sha in wanted if sha in places}
    return [{**json.loads(pair.to_json()), "across_splits": pair.across_splits,
             "across_labels": pair.across_labels, "thumbnail_a": images.get(pair.sha256_a, ""),
             "thumbnail_b": images.get(pair.sha256_b, "")} for pair in pairs]


def _stored_thumbnail(root: str, place: Mapping) -> str:
    path = FileSystems.join(root, *place["path"].split("/"))
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        handle.seek(place["offset"])
        encoded = handle.read(place["length"])
    try:
        return image_data_uri(Image.open(io.BytesIO(encoded)), THUMBNAIL_SIDE)
    except Exception:  # noqa: BLE001 - raw pixel storage has no header: no thumbnail
        return ""


def _near_duplicates(manifest, rows) -> str:
    summary = manifest.near_duplicates or {}
    if not summary:
        return _section("near-duplicates", "<p>Not computed.</p>")
    parts = [f"<p>{summary['pairs']} pair(s) of distinct images within "
             f"{summary['threshold']} bits of each other's perceptual hash "
             f"(<code>{_e(summary['path'])}</code>): "
             f"<b class=\"{'bad-text' if summary['across_splits'] else ''}\">"
             f"{summary['across_splits']} across splits</b> (the same picture in training "
             f"and evaluation: leakage), {summary['across_labels']} across labels (possible "
             "label noise).</p>"]
    for row in rows:
        cells = "".join(
            f'<figure><img src="{row[f"thumbnail_{side}"]}" alt=""><figcaption>'
            f'{_e(row[f"split_{side}"])}: {_e(", ".join(row[f"labels_{side}"]))}<br>'
            f'{_e(row[f"sha256_{side}"][:12])}</figcaption></figure>'
            if row[f"thumbnail_{side}"] else
            f'<figure><figcaption>{_e(row[f"sha256_{side}"][:12])}</figcaption></figure>'
            for side in ("a", "b"))
        kinds = ", ".join(kind for kind, flag in (("across splits", row["across_splits"]),
                                                  ("across labels", row["across_labels"]))
                          if flag)
        parts.append(f'<div class="thumbrow"><div class="thumblabel">distance '
                     f'{row["distance"]}<br>{_e(kinds)}</div><div class="thumbs">{cells}'
                     "</div></div>")
    # A pair across splits and labels counts in both; manifests before `anomalous` lack it.
    anomalous = summary.get("anomalous", summary["across_splits"] + summary["across_labels"])
    if anomalous > len(rows):
        parts.append(f'<p class="muted">the first {len(rows)} are shown.</p>')
    return _section("near-duplicates", "".join(parts))


def _drift(anomalies) -> str:
    baseline = anomalies.get("baseline")
    if not baseline:
        return _section("drift", "<p>No baseline given (<code>--baseline_stats URI</code> "
                                 "compares with an earlier run's statistics).</p>")
    found = anomalies.get("anomalies", [])
    parts = [f"<p>Compared with <code>{_e(baseline)}</code>.</p>"]
    if found:
        rows = [(a["severity"], a["kind"], a["split"], a.get("feature") or "", a["description"])
                for a in found]
        parts.append(f'<p class="bad-text">{len(found)} anomal{"y" if len(found) == 1 else "ies"}'
                     "</p>" + table(["severity", "kind", "split", "feature", "what"], rows))
    else:
        parts.append('<p class="good-text">No anomalies: nothing moved past its threshold.</p>')
    metric_rows = [(name, key, f"{value:.4f}" if isinstance(value, float) else value)
                   for name, values in anomalies.get("metrics", {}).items()
                   for key, value in values.items()]
    if metric_rows:
        parts.append("<h3>Metrics</h3>" + table(["metric", "over", "value"], metric_rows,
                                                  numeric=(2,)))
    parts.append(f'<p class="muted">thresholds: {_e(json.dumps(anomalies.get("thresholds")))}'
                 "</p>")
    return _section("drift", "".join(parts))


def _config(manifest, timings) -> str:
    rows = [(name, f"{value:.2f}" if isinstance(value, float) else value)
            for name, value in timings.items()]
    return _section("config", (
        f"<pre>{_e(json.dumps(manifest.config, indent=2))}</pre>"
        "<h3>Timings</h3>" + table(["", "value"], rows, numeric=(1,))
        + '<p class="muted">Seconds since the pipeline was built. Beam runs steps '
        "concurrently, so milestones overlap; the statistics' share of wall time is "
        "measured by <code>tests/benchmarks/stats_overhead.py</code> (same corpus with "
        "and without them).</p>"
    ))





def duplicate_row(image) -> dict:
    """A UniqueImage seen under several uris -> the dict the report lists."""
    return {"sha256": image.sha256, "uris": list(image.uris), "labels": list(image.labels),
            "label_conflict": bool(image.label_conflict)}


write_report = html_page.write_page


def shards_in_reading_order(manifest: Manifest) -> list[tuple[str, str]]:
    """(split, relative path) of every shard: the first shard of each split, then the
    second of each, ...: thumbnails come from every split early."""
    per_split = defaultdict(list)
    for split in manifest.splits:
        per_split[split].extend(manifest.shard_paths(split))
    order = []
    for index in range(max((len(v) for v in per_split.values()), default=0)):
        for split, paths in per_split.items():
            if index < len(paths):
                order.append((split, paths[index]))
    return order

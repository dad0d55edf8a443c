"""Drift against a previous run's statistics: what changed enough to look at.

Pure functions over two `DatasetFeatureStatisticsList` protos (see statistics.py).
Checks, each against a threshold in `DriftThresholds`:
  class_vanished / class_appeared  a label with images in one run and none in the other
  label_distribution_shift         per split and over all splits pooled: L-infinity
                                   distance (TFDV's categorical drift metric) or
                                   Jensen-Shannon divergence (base 2, 0..1) of the
                                   label distributions
  error_rate_increase              dead letters / files seen rose by more than a margin
  image_size_shift                 Jensen-Shannon divergence of the pooled original
                                   height / width histograms
  split_vanished / split_appeared  a split with images in one run only
Severity "error" for what breaks a model's contract (a class the model knows is gone),
"warning" for the rest. The result is what `stats/anomalies.json` holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from pipelines.stats import feature_stats as stats_lib

ANOMALIES_PATH = "stats/anomalies.json"  # relative to the output root
POOLED = "all"  # the "split" of checks over every split together


@dataclasses.dataclass(frozen=True)
class DriftThresholds:
    """Above these a change is an anomaly. Distances: L-infinity of label shares (0..1)
    and Jensen-Shannon divergence with log base 2 (0..1); rates are fractions."""

    label_linf: float = 0.1
    label_js: float = 0.05
    size_js: float = 0.1
    error_rate_increase: float = 0.02


def normalize(counts: Mapping[str, float]) -> dict[str, float]:
    """Counts -> shares summing to 1 ({} for no counts)."""
    total = sum(counts.values())
    return {key: value / total for key, value in counts.items()} if total else {}


def linf_distance(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """max over keys of |p - q| of two distributions (missing keys are 0)."""
    keys = sorted(set(p) | set(q))
    return max((abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys), default=0.0)


def js_divergence(p: Mapping, q: Mapping) -> float:
    """Jensen-Shannon divergence (log base 2, so 0..1) of two distributions."""
    keys = sorted(set(p) | set(q))  # fixed order: the float sum is reproducible

    def kl(a: Mapping, m: Mapping) -> float:
        return sum(a[k] * math.log2(a[k] / m[k]) for k in keys if a.get(k, 0.0) > 0)

    mixture = {k: (p.get(k, 0.0) + q.get(k, 0.0)) / 2 for k in keys}
    return max(0.0, 0.5 * kl(p, mixture) + 0.5 * kl(q, mixture))


def rebin(buckets: Iterable[tuple[float, float, float]], edges: Sequence[float]) -> list[float]:
    """Histogram buckets -> counts on `edges` (sorted), spreading each bucket's count
    uniformly over its range; a zero-width bucket goes to the bin holding its value."""
    counts = [0.0] * (len(edges) - 1)
    for low, high, count in buckets:
        if count == 0:
            continue
        if high <= low:
            index = max(0, min(len(counts) - 1, _bin_of(low, edges)))
            counts[index] += count
            continue
        for index in range(len(counts)):
            overlap = min(high, edges[index + 1]) - max(low, edges[index])
            if overlap > 0:
                counts[index] += count * overlap / (high - low)
    return counts


def _bin_of(value: float, edges: Sequence[float]) -> int:
    for index in range(len(edges) - 1):
        if edges[index] <= value < edges[index + 1]:
            return index
    return len(edges) - 2


def histogram_js(a: Sequence[tuple[float, float, float]],
                 b: Sequence[tuple[float, float, float]]) -> float:
    """JS divergence of two numeric histograms after rebinning both onto the union of
    their bucket edges (exact when the edges agree, as the fixed log buckets do)."""
    if not a or not b:
        return 0.0
    edges = sorted({edge for low, high, _ in [*a, *b] for edge in (low, high)})
    if len(edges) < 2:
        return 0.0
    p = dict(enumerate(rebin(a, edges)))
    q = dict(enumerate(rebin(b, edges)))
    return js_divergence(normalize(p), normalize(q))


def pooled_labels(stats) -> Counter:
    """Label counts over every split of a statistics list."""
    pooled: Counter = Counter()
    for dataset in stats_lib.split_datasets(stats).values():
        pooled.update(stats_lib.value_counts(dataset, stats_lib.LABELS))
    return pooled


def pooled_histogram(stats, path: str) -> list[tuple[float, float, float]]:
    """A numeric feature's STANDARD histogram buckets summed over splits (by bucket)."""
    summed: Counter = Counter()
    for dataset in stats_lib.split_datasets(stats).values():
        for low, high, count in stats_lib.standard_histogram(dataset, path):
            summed[(low, high)] += count
    return sorted((low, high, count) for (low, high), count in summed.items())


def detect_drift(
    current,
    baseline,
    thresholds: DriftThresholds = DriftThresholds(),
) -> dict:
    """Compares this run's statistics list with a baseline's.

    Returns {"thresholds": {...}, "anomalies": [{kind, severity, split, feature,
    value, threshold, description}], "metrics": {name: {split: value}}}: the
    anomalies are the flagged changes; metrics hold every number computed, flagged
    or not, so a dashboard can track them.
    """
    anomalies: list[dict] = []
    metrics: dict[str, dict] = {}

    def flag(kind, severity, split, feature, value, threshold, description):
        anomalies.append({"kind": kind, "severity": severity, "split": split,
                          "feature": feature, "value": value, "threshold": threshold,
                          "description": description})

    now_labels, then_labels = pooled_labels(current), pooled_labels(baseline)
    now_present = {k for k, v in now_labels.items() if v > 0}
    then_present = {k for k, v in then_labels.items() if v > 0}
    for label in sorted(then_present - now_present):
        flag("class_vanished", "error", POOLED, stats_lib.LABELS, 0, None,
             f"class {label!r} had {then_labels[label]} images in the baseline, none now")
    for label in sorted(now_present - then_present):
        flag("class_appeared", "warning", POOLED, stats_lib.LABELS, now_labels[label], None,
             f"class {label!r} is new: {now_labels[label]} images, none in the baseline")

    now_splits = stats_lib.split_datasets(current)
    then_splits = stats_lib.split_datasets(baseline)
    label_sets = {POOLED: (now_labels, then_labels)}
    for split in now_splits:
        if split in then_splits:
            label_sets[split] = (stats_lib.value_counts(now_splits[split], stats_lib.LABELS),
                                 stats_lib.value_counts(then_splits[split], stats_lib.LABELS))
    for split in sorted(set(then_splits) - set(now_splits)):
        if then_splits[split].num_examples:
            flag("split_vanished", "warning", split, None, 0, None,
                 f"split {split!r} had {then_splits[split].num_examples} images in the "
                 "baseline and is not in this run")
    for split in sorted(set(now_splits) - set(then_splits)):
        if now_splits[split].num_examples:
            flag("split_appeared", "warning", split, None, now_splits[split].num_examples,
                 None, f"split {split!r} is new in this run")

    for split, (now, then) in label_sets.items():
        if not sum(now.values()) or not sum(then.values()):
            continue
        p, q = normalize(now), normalize(then)
        linf = linf_distance(p, q)
        js = js_divergence(p, q)
        metrics.setdefault("label_linf", {})[split] = linf
        metrics.setdefault("label_js", {})[split] = js
        if linf > thresholds.label_linf or js > thresholds.label_js:
            # Sorted first so a tie names the same label on every run (set order is
            # salted per process).
            worst = max(sorted(set(p) | set(q)), key=lambda k: abs(p.get(k, 0) - q.get(k, 0)))
            flag("label_distribution_shift", "warning", split, stats_lib.LABELS,
                 {"linf": linf, "js": js},
                 {"linf": thresholds.label_linf, "js": thresholds.label_js},
                 f"label shares moved (L-inf {linf:.3f}, JS {js:.3f}); most: {worst!r} "
                 f"{q.get(worst, 0):.1%} -> {p.get(worst, 0):.1%}")

    now_rate, then_rate = stats_lib.error_rate(current), stats_lib.error_rate(baseline)
    if now_rate is not None and then_rate is not None:
        metrics["error_rate"] = {"current": now_rate, "baseline": then_rate}
        if now_rate - then_rate > thresholds.error_rate_increase:
            now_reasons = _reasons(current)
            new = sorted(set(now_reasons) - set(_reasons(baseline)))
            flag("error_rate_increase", "warning", POOLED, stats_lib.REASON, now_rate,
                 then_rate + thresholds.error_rate_increase,
                 f"dead letters rose from {then_rate:.1%} to {now_rate:.1%} of files"
                 + (f"; new reasons: {', '.join(new)}" if new else ""))

    for path in (stats_lib.ORIGINAL_HEIGHT, stats_lib.ORIGINAL_WIDTH):
        now_hist, then_hist = pooled_histogram(current, path), pooled_histogram(baseline, path)
        if not now_hist or not then_hist:
            continue
        js = histogram_js(now_hist, then_hist)
        metrics.setdefault("size_js", {})[path] = js
        if js > thresholds.size_js:
            flag("image_size_shift", "warning", POOLED, path, js, thresholds.size_js,
                 f"{path} distribution moved (JS {js:.3f}); median "
                 f"{_median(then_hist):.0f} -> {_median(now_hist):.0f}")
    return {
        "thresholds": dataclasses.asdict(thresholds),
        "anomalies": anomalies,
        "metrics": metrics,
    }


def no_baseline() -> dict:
    """What anomalies.json holds when no baseline was given."""
    return {"thresholds": dataclasses.asdict(DriftThresholds()), "anomalies": [], "metrics": {}}


def _reasons(stats) -> dict[str, int]:
    dataset = stats_lib.dead_letters(stats)
    return stats_lib.value_counts(dataset, stats_lib.REASON) if dataset is not None else {}


def _median(histogram: Sequence[tuple[float, float, float]]) -> float:
    """Approximate median of a histogram (interpolated within the bucket)."""
    total = sum(count for _, _, count in histogram)
    seen = 0.0
    for low, high, count in histogram:
        if count and seen + count >= total / 2:
            return low + (high - low) * (total / 2 - seen) / count
        seen += count
    return 0.0

"""Dataset statistics as TFDV writes them: a `DatasetFeatureStatisticsList` proto.

`stats/statistics.pb` is the serialized list, the format `tfdv.load_stats_binary`
reads and Facets shows. One dataset per split, named after it, plus one named
`dead-letters` (a name no split can have) describing the files that became errors,
so a later run can compare error rates against this one.

Features of a split dataset (paths; one step each):
  image/class/text        STRING  label histogram (rank_histogram, top_values): each
                                  label counted once per image carrying it
  image/format            STRING  stored format (jpeg, png, raw)
  image/height, image/width  INT  stored size
  image/original/height, image/original/width  INT  source size, upright
  image/encoded           BYTES   stored bytes per image (min/avg/max); custom stats
                                  `pixel_mean/{r,g,b}`, `pixel_std/{r,g,b}` (0..255)
  image/num_bytes         INT     stored bytes per image as a number (histograms)
  source/format           STRING  source file format (JPEG, PNG, ...)
  source/num_bytes        INT     source file size in bytes
The last three are derived, not keys of the Example. Numeric histograms: STANDARD
with fixed log-scale buckets [2^(k/4), 2^((k+1)/4)) (the same edges in every run,
so runs compare bucket by bucket) and QUANTILES (10 equal-mass buckets). Values from
2048 up are kept at 11 significant bits for quantiles and the median (< 0.05% off);
counts, mean, std, min, max and the STANDARD histogram are exact.

The `dead-letters` dataset: num_examples = dead letters; STRING features `reason`
and `stage`; `reason` carries custom stats `files_seen` and `error_rate`.

Pure functions build the proto from per-split aggregates; `AggregateSplits` is
the Beam combine that makes those aggregates from UniqueImages.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from tensorflow_metadata.proto.v0 import statistics_pb2

STATISTICS_PATH = "stats/statistics.pb"  # relative to the output root
DEAD_LETTERS = "dead-letters"  # dataset name; a split name is an identifier, no '-'

LABELS = "image/class/text"
STORED_FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
ORIGINAL_HEIGHT = "image/original/height"
ORIGINAL_WIDTH = "image/original/width"
ENCODED = "image/encoded"
STORED_BYTES = "image/num_bytes"
SOURCE_FORMAT = "source/format"
SOURCE_BYTES = "source/num_bytes"
REASON = "reason"
STAGE = "stage"
NUMERIC_FEATURES = (HEIGHT, WIDTH, ORIGINAL_HEIGHT, ORIGINAL_WIDTH, STORED_BYTES, SOURCE_BYTES)
CHANNELS = ("r", "g", "b")

_BUCKETS_PER_OCTAVE = 4
_EXACT_BELOW = 2048
_KEPT_BITS = 11
_QUANTILE_BUCKETS = 10


def log_bucket(value: float) -> int:
    """Index k of the fixed bucket [2^(k/4), 2^((k+1)/4)) holding `value`; -1000 for < 1."""
    if value < 1:
        return -1000
    k = math.floor(_BUCKETS_PER_OCTAVE * math.log2(value))
    # Guard float rounding at exact edges (2^(k/4) computed back may differ by an ulp).
    if bucket_edges(k + 1)[0] <= value:
        k += 1
    elif bucket_edges(k)[0] > value:
        k -= 1
    return k


def bucket_edges(k: int) -> tuple[float, float]:
    """(low, high) of log bucket k; k = -1000 is [0, 1)."""
    if k == -1000:
        return 0.0, 1.0
    return 2.0 ** (k / _BUCKETS_PER_OCTAVE), 2.0 ** ((k + 1) / _BUCKETS_PER_OCTAVE)


def _quantize(value: int) -> int:
    """Exact below 2048, else rounded down to 11 significant bits: bounded distinct keys."""
    if value < _EXACT_BELOW:
        return value
    shift = value.bit_length() - _KEPT_BITS
    return (value >> shift) << shift


@dataclasses.dataclass
class NumericAccumulator:
    """Running statistics of one integer feature; merges associatively."""

    count: int = 0
    total: float = 0.0
    total_squares: float = 0.0
    minimum: int | None = None
    maximum: int | None = None
    zeros: int = 0
    values: Counter = dataclasses.field(default_factory=Counter)  # quantized value -> n
    buckets: Counter = dataclasses.field(default_factory=Counter)  # log bucket k -> n

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.total_squares += float(value) * value
        self.minimum = value if self.minimum is None else min(self.minimum, value)
        self.maximum = value if self.maximum is None else max(self.maximum, value)
        self.zeros += value == 0
        self.values[_quantize(value)] += 1
        self.buckets[log_bucket(value)] += 1

    def merge(self, other: NumericAccumulator) -> None:
        if other.count == 0:
            return
        self.count += other.count
        self.total += other.total
        self.total_squares += other.total_squares
        self.minimum = other.minimum if self.minimum is None else min(self.minimum, other.minimum)
        self.maximum = other.maximum if self.maximum is None else max(self.maximum, other.maximum)
        self.zeros += other.zeros
        self.values.update(other.values)
        self.buckets.update(other.buckets)

    def quantile(self, q: float) -> float:
        """The value at rank ceil(q * count) (the minimum for q = 0)."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for value in sorted(self.values):
            seen += self.values[value]
            if seen >= rank:
                return float(value)
        return float(self.maximum)


@dataclasses.dataclass
class SplitAggregate:
    """Everything the statistics of one split need; a few KB however many images."""

    num_examples: int = 0
    labels: Counter = dataclasses.field(default_factory=Counter)
    labels_per_image: Counter = dataclasses.field(default_factory=Counter)
    stored_formats: Counter = dataclasses.field(default_factory=Counter)
    source_formats: Counter = dataclasses.field(default_factory=Counter)
    numeric: dict = dataclasses.field(
        default_factory=lambda: {name: NumericAccumulator() for name in NUMERIC_FEATURES}
    )
    channel_sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    channel_squared_sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_count: int = 0

    def add_image(self, image, height: int, width: int, image_format: str) -> None:
        """Adds one UniqueImage stored at `height` x `width` as `image_format`."""
        self.num_examples += 1
        self.labels.update(image.labels)
        self.labels_per_image[len(image.labels)] += 1
        self.stored_formats[image_format] += 1
        meta = image.meta
        self.source_formats[meta.source_format] += 1
        for name, value in (
            (HEIGHT, height),
            (WIDTH, width),
            (ORIGINAL_HEIGHT, meta.original_height),
            (ORIGINAL_WIDTH, meta.original_width),
            (STORED_BYTES, image.stored_bytes),
            (SOURCE_BYTES, image.source_bytes),
        ):
            self.numeric[name].add(int(value))
        for channel in range(3):
            self.channel_sums[channel] += meta.channel_sums[channel]
            self.channel_squared_sums[channel] += meta.channel_squared_sums[channel]
        self.pixel_count += height * width

    def merge(self, other: SplitAggregate) -> None:
        self.num_examples += other.num_examples
        self.labels.update(other.labels)
        self.labels_per_image.update(other.labels_per_image)
        self.stored_formats.update(other.stored_formats)
        self.source_formats.update(other.source_formats)
        for name, accumulator in other.numeric.items():
            self.numeric[name].merge(accumulator)
        for channel in range(3):
            self.channel_sums[channel] += other.channel_sums[channel]
            self.channel_squared_sums[channel] += other.channel_squared_sums[channel]
        self.pixel_count += other.pixel_count

    def pixel_mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the stored 0..255 pixels (float64 sums)."""
        if self.pixel_count == 0:
            return [0.0] * 3, [0.0] * 3
        means = [s / self.pixel_count for s in self.channel_sums]
        stds = [math.sqrt(max(q / self.pixel_count - m * m, 0.0))
                for q, m in zip(self.channel_squared_sums, means, strict=True)]
        return means, stds


@dataclasses.dataclass(frozen=True)
class DeadLetterSummary:
    """What the dead letters of a run add up to."""

    files_seen: int
    reasons: dict[str, int]
    stages: dict[str, int]

    @property
    def count(self) -> int:
        return sum(self.reasons.values())


def summarize_dead_letters(errors: Iterable, files_seen: int) -> DeadLetterSummary:
    """ErrorRows (anything with `.reason` and `.stage`) -> counts by reason and stage."""
    errors = list(errors)
    return DeadLetterSummary(
        files_seen=files_seen,
        reasons=dict(Counter(e.reason for e in errors)),
        stages=dict(Counter(e.stage for e in errors)),
    )


class SplitStatisticsFn(beam.CombineFn):
    """UniqueImage -> SplitAggregate (combine per split key)."""

    def __init__(self, height: int, width: int, image_format: str):
        self._height = height
        self._width = width
        self._format = image_format

    def create_accumulator(self) -> SplitAggregate:
        return SplitAggregate()

    def add_input(self, accumulator: SplitAggregate, image) -> SplitAggregate:
        accumulator.add_image(image, self._height, self._width, self._format)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[SplitAggregate]) -> SplitAggregate:
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for accumulator in accumulators:
            merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator: SplitAggregate) -> SplitAggregate:
        return accumulator


class AggregateSplits(beam.PTransform):
    """UniqueImage -> (split, SplitAggregate), one per split that has images."""

    def __init__(self, height: int, width: int, image_format: str):
        super().__init__()
        self._fn = SplitStatisticsFn(height, width, image_format)

    def expand(self, unique_images):
        return (
            unique_images
            | "KeyBySplit" >> beam.Map(lambda image: (image.split, image))
            # (split, SplitAggregate): combined before the shuffle, a few KB per worker
            | "CombinePerSplit" >> beam.CombinePerKey(self._fn)
        )


# --- the proto -------------------------------------------------------------------------


def build_statistics(
    aggregates: Mapping[str, SplitAggregate],
    split_names: Sequence[str],
    dead_letters: DeadLetterSummary,
) -> statistics_pb2.DatasetFeatureStatisticsList:
    """Per-split aggregates -> the statistics list: one dataset per split (in
    `split_names` order, empty splits included with num_examples 0), then `dead-letters`."""
    result = statistics_pb2.DatasetFeatureStatisticsList()
    for name in split_names:
        result.datasets.append(split_dataset(name, aggregates.get(name, SplitAggregate())))
    result.datasets.append(dead_letter_dataset(dead_letters))
    return result


def split_dataset(name: str, aggregate: SplitAggregate) -> statistics_pb2.DatasetFeatureStatistics:
    """One split's DatasetFeatureStatistics; no features when the split is empty."""
    dataset = statistics_pb2.DatasetFeatureStatistics(
        name=name, num_examples=aggregate.num_examples
    )
    if aggregate.num_examples == 0:
        return dataset
    n = aggregate.num_examples
    labelled = n - aggregate.labels_per_image.get(0, 0)
    per_image = aggregate.labels_per_image
    _add_string_feature(dataset, LABELS, aggregate.labels, n, num_non_missing=labelled,
                        min_values=min(per_image), max_values=max(per_image))
    _add_string_feature(dataset, STORED_FORMAT, aggregate.stored_formats, n)
    for feature in NUMERIC_FEATURES:
        _add_numeric_feature(dataset, feature, aggregate.numeric[feature])
    stored = aggregate.numeric[STORED_BYTES]
    encoded = _new_feature(dataset, ENCODED, statistics_pb2.FeatureNameStatistics.BYTES)
    encoded.bytes_stats.common_stats.CopyFrom(_common_stats(n, n, 1, 1, n))
    encoded.bytes_stats.avg_num_bytes = stored.total / n
    encoded.bytes_stats.min_num_bytes = float(stored.minimum)
    encoded.bytes_stats.max_num_bytes = float(stored.maximum)
    encoded.bytes_stats.max_num_bytes_int = int(stored.maximum)
    means, stds = aggregate.pixel_mean_std()
    for channel, mean, std in zip(CHANNELS, means, stds, strict=True):
        encoded.custom_stats.add(name=f"pixel_mean/{channel}", num=mean)
        encoded.custom_stats.add(name=f"pixel_std/{channel}", num=std)
    _add_string_feature(dataset, SOURCE_FORMAT, aggregate.source_formats, n)
    return dataset


def dead_letter_dataset(summary: DeadLetterSummary) -> statistics_pb2.DatasetFeatureStatistics:
    """The dataset describing the dead letters (reasons, stages, error rate)."""
    dataset = statistics_pb2.DatasetFeatureStatistics(name=DEAD_LETTERS,
                                                      num_examples=summary.count)
    reason = _add_string_feature(dataset, REASON, Counter(summary.reasons), summary.count)
    _add_string_feature(dataset, STAGE, Counter(summary.stages), summary.count)
    reason.custom_stats.add(name="files_seen", num=summary.files_seen)
    reason.custom_stats.add(name="error_rate",
                            num=summary.count / summary.files_seen if summary.files_seen else 0.0)
    return dataset


def _new_feature(dataset, path: str, feature_type) -> statistics_pb2.FeatureNameStatistics:
    feature = dataset.features.add(type=feature_type)
    feature.path.step.append(path)
    return feature


def _common_stats(num_non_missing: int, num_examples: int, min_values: int, max_values: int,
                  total_values: int) -> statistics_pb2.CommonStatistics:
    return statistics_pb2.CommonStatistics(
        num_non_missing=num_non_missing,
        num_missing=num_examples - num_non_missing,
        min_num_values=min_values,
        max_num_values=max_values,
        avg_num_values=total_values / num_non_missing if num_non_missing else 0.0,
        tot_num_values=total_values,
    )


def _add_string_feature(dataset, path: str, counts: Counter, num_examples: int,
                        num_non_missing: int | None = None, min_values: int = 1,
                        max_values: int = 1) -> statistics_pb2.FeatureNameStatistics:
    """A STRING feature from value counts: top_values and rank_histogram, most frequent
    first (ties by value)."""
    feature = _new_feature(dataset, path, statistics_pb2.FeatureNameStatistics.STRING)
    stats = feature.string_stats
    total = sum(counts.values())
    non_missing = num_examples if num_non_missing is None else num_non_missing
    if total == 0:
        non_missing, min_values, max_values = 0, 0, 0
    stats.common_stats.CopyFrom(
        _common_stats(non_missing, num_examples, min_values, max_values, total))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    stats.unique = len(ranked)
    stats.avg_length = (sum(len(v) * c for v, c in ranked) / total) if total else 0.0
    for rank, (value, count) in enumerate(ranked):
        stats.top_values.add(value=value, frequency=count)
        stats.rank_histogram.buckets.add(low_rank=rank, high_rank=rank, label=value,
                                         sample_count=count)
    return feature


def _add_numeric_feature(dataset, path: str, acc: NumericAccumulator) -> None:
    feature = _new_feature(dataset, path, statistics_pb2.FeatureNameStatistics.INT)
    stats = feature.num_stats
    n = acc.count
    stats.common_stats.CopyFrom(_common_stats(n, n, 1, 1, n))
    mean = acc.total / n
    stats.mean = mean
    stats.std_dev = math.sqrt(max(acc.total_squares / n - mean * mean, 0.0))
    stats.num_zeros = acc.zeros
    stats.min = float(acc.minimum)
    stats.max = float(acc.maximum)
    stats.median = acc.quantile(0.5)
    standard = stats.histograms.add(type=statistics_pb2.Histogram.STANDARD)
    # Every bucket from the smallest value's to the largest's, empty ones included.
    filled = sorted(k for k in acc.buckets if k != -1000)
    indices = [-1000] if -1000 in acc.buckets else []
    indices += list(range(filled[0], filled[-1] + 1)) if filled else []
    for k in indices:
        low, high = bucket_edges(k)
        standard.buckets.add(low_value=low, high_value=high, sample_count=acc.buckets.get(k, 0))
    quantiles = stats.histograms.add(type=statistics_pb2.Histogram.QUANTILES)
    edges = [acc.quantile(i / _QUANTILE_BUCKETS) for i in range(_QUANTILE_BUCKETS + 1)]
    for low, high in zip(edges, edges[1:], strict=False):
        quantiles.buckets.add(low_value=low, high_value=high, sample_count=n / _QUANTILE_BUCKETS)


# --- reading it back -------------------------------------------------------------------


def write_statistics(path: str, stats: statistics_pb2.DatasetFeatureStatisticsList) -> None:
    """Writes the serialized list to `path` (local or gs://)."""
    with FileSystems.create(path) as handle:
        handle.write(stats.SerializeToString(deterministic=True))


def read_statistics(uri: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    """Parses a serialized DatasetFeatureStatisticsList (what tfdv.load_stats_binary reads)."""
    with FileSystems.open(uri, compression_type="uncompressed") as handle:
        return parse_statistics(handle.read())


def parse_statistics(data: bytes) -> statistics_pb2.DatasetFeatureStatisticsList:
    stats = statistics_pb2.DatasetFeatureStatisticsList()
    stats.ParseFromString(data)
    return stats


def add_near_duplicate_counts(stats, pairs: Iterable) -> None:
    """Adds each split's near-duplicate counts to its image feature's custom stats:
    pairs with an image in the split, and of those the ones across splits or labels."""
    counts: dict[str, Counter] = {}
    for pair in pairs:
        across_splits, across_labels = pair.across_splits, pair.across_labels
        for split in {pair.split_a, pair.split_b}:
            # Item by item: Counter.update(**kwargs) costs more, and runs can have
            # tens of thousands of pairs.
            count = counts.setdefault(split, Counter())
            count["pairs"] += 1
            count["across_splits"] += across_splits
            count["across_labels"] += across_labels
    for name, dataset in split_datasets(stats).items():
        encoded = find_feature(dataset, ENCODED)
        if encoded is None:
            continue
        for kind in ("pairs", "across_splits", "across_labels"):
            encoded.custom_stats.add(name=f"near_duplicates/{kind}",
                                     num=counts.get(name, Counter())[kind])


def split_datasets(stats) -> dict[str, statistics_pb2.DatasetFeatureStatistics]:
    """{split name: dataset}, in file order, without the dead-letters dataset."""
    return {d.name: d for d in stats.datasets if d.name != DEAD_LETTERS}


def dead_letters(stats) -> statistics_pb2.DatasetFeatureStatistics | None:
    return next((d for d in stats.datasets if d.name == DEAD_LETTERS), None)


def find_feature(dataset, path: str) -> statistics_pb2.FeatureNameStatistics | None:
    """The feature whose path (or legacy name) is `path`, or None."""
    for feature in dataset.features:
        if "/".join(feature.path.step) == path or feature.name == path:
            return feature
    return None


def value_counts(dataset, path: str) -> dict[str, int]:
    """A STRING feature's {value: count} from its rank histogram; {} if absent."""
    feature = find_feature(dataset, path)
    if feature is None:
        return {}
    return {b.label: int(b.sample_count) for b in feature.string_stats.rank_histogram.buckets}


def standard_histogram(dataset, path: str) -> list[tuple[float, float, float]]:
    """A numeric feature's STANDARD histogram as [(low, high, count)]; [] if absent."""
    feature = find_feature(dataset, path)
    if feature is None:
        return []
    for histogram in feature.num_stats.histograms:
        if histogram.type == statistics_pb2.Histogram.STANDARD:
            return [(b.low_value, b.high_value, b.sample_count) for b in histogram.buckets]
    return []


def custom_stat(feature, name: str) -> float | None:
    for stat in feature.custom_stats:
        if stat.name == name:
            return stat.num
    return None


def error_rate(stats) -> float | None:
    """The run's dead letters / files seen, from the dead-letters dataset (None if absent)."""
    dataset = dead_letters(stats)
    feature = dataset and find_feature(dataset, REASON)
    return custom_stat(feature, "error_rate") if feature is not None else None

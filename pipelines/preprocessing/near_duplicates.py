"""Near-duplicates: distinct contents whose stored pixels look the same (re-encoded,
resized, cropped a little, brightness-shifted copies).

Each image carries a 64-bit perceptual hash (`ImageMeta.perceptual_hash`). Comparing all
pairs is quadratic, so candidates come from locality-sensitive keys instead: each of
`BANDS` keys samples `BAND_BITS` fixed, seeded bit positions of the hash, and two images
become a candidate pair when any key agrees. Close hashes agree on some key with high
probability (`recall_bound` says how high for a distance), far ones rarely; candidates
are then checked exactly against the Hamming threshold. A key shared by more than
`MAX_BUCKET` images (flat, blank or synthetic images) compares only its first
`MAX_BUCKET`, by hash order, so one degenerate bucket cannot make the job quadratic.

Shapes:
  UniqueImage -> (band key, Member)   `BANDS` keys per hashed image
  -> GroupByKey -> candidate pairs within each bucket, checked exactly
  -> Distinct -> NearDuplicatePair (sha256_a < sha256_b), once however many keys agree
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np

from pipelines.contract.imaging import PHASH_BITS

DEFAULT_THRESHOLD = 12  # bits of 64: docs/data-contract.md says how it was chosen
BANDS = 32
BAND_BITS = 11
MAX_BUCKET = 2000
_BAND_POSITIONS = tuple(tuple(sorted(random.Random(band).sample(range(PHASH_BITS), BAND_BITS)))
                        for band in range(BANDS))
PATH = "stats/near_duplicates.jsonl"  # relative to the output root


@dataclasses.dataclass(frozen=True, order=True)
class Member:
    """What pairing needs of one image (small: it crosses a shuffle once per band)."""

    perceptual_hash: int
    sha256: str
    split: str
    labels: tuple[str, ...]
    established: bool = False  # stored by an earlier output (--reuse_from): its split stays


@dataclasses.dataclass(frozen=True)
class NearDuplicatePair:
    sha256_a: str  # the smaller of the two
    sha256_b: str
    distance: int  # Hamming distance of the perceptual hashes
    split_a: str
    split_b: str
    labels_a: tuple[str, ...]
    labels_b: tuple[str, ...]
    # Not written: whether each image was stored by the earlier output (keep_together).
    established_a: bool = dataclasses.field(default=False, compare=False)
    established_b: bool = dataclasses.field(default=False, compare=False)

    @property
    def across_splits(self) -> bool:
        """Leakage: the same picture in two splits."""
        return self.split_a != self.split_b

    @property
    def across_labels(self) -> bool:
        """Possible label noise: the same picture under different labels."""
        return set(self.labels_a) != set(self.labels_b)

    def to_json(self) -> str:
        row = dataclasses.asdict(self)
        del row["established_a"], row["established_b"]
        row["labels_a"], row["labels_b"] = list(self.labels_a), list(self.labels_b)
        return json.dumps(row, sort_keys=True)


def band_keys(perceptual_hash: int) -> list[tuple[int, int]]:
    """(band, the hash's bits at that band's positions) for every band."""
    keys = []
    for band, positions in enumerate(_BAND_POSITIONS):
        value = 0
        for position in positions:
            value = (value << 1) | ((perceptual_hash >> position) & 1)
        keys.append((band, value))
    return keys


def recall_bound(distance: int, bands: int = BANDS, band_bits: int = BAND_BITS,
                 bits: int = PHASH_BITS) -> float:
    """The chance that two hashes `distance` bits apart share at least one band key, for
    bands that sample positions independently (ours are fixed samples: the average over
    which bits differ)."""
    same = math.comb(bits - distance, band_bits) / math.comb(bits, band_bits)
    return 1 - (1 - same) ** bands


def pairs_in_bucket(members: Iterable[Member], threshold: int,
                    limit: int = MAX_BUCKET) -> Iterator[NearDuplicatePair]:
    """Every pair of the bucket within `threshold` bits, the bucket cut to `limit`.
    Buckets of random keys are small and compared in plain Python; those of look-alike
    images can be large, and compare each member against the rest at once in NumPy."""
    members = sorted(members, key=lambda m: (m.perceptual_hash, m.sha256))[:limit]
    if len(members) < _NUMPY_FROM:
        for i, first in enumerate(members):
            for second in members[i + 1:]:
                distance = (first.perceptual_hash ^ second.perceptual_hash).bit_count()
                if distance <= threshold:
                    yield make_pair(first, second, distance)
        return
    hashes = np.array([member.perceptual_hash for member in members], dtype=np.uint64)
    for i, first in enumerate(members[:-1]):
        distances = np.bitwise_count(hashes[i + 1:] ^ hashes[i])
        for j in np.flatnonzero(distances <= threshold):
            yield make_pair(first, members[i + 1 + j], int(distances[j]))


_NUMPY_FROM = 64  # bucket size from which NumPy's per-call cost pays


def make_pair(first: Member, second: Member, distance: int) -> NearDuplicatePair:
    a, b = sorted((first, second), key=lambda member: member.sha256)
    return NearDuplicatePair(a.sha256, b.sha256, distance, a.split, b.split, a.labels,
                             b.labels, a.established, b.established)


def find_pairs(members: Sequence[Member], threshold: int = DEFAULT_THRESHOLD
               ) -> list[NearDuplicatePair]:
    """The pipeline's answer for a list in memory (tests, benchmarks): the same keys and
    checks as `FindNearDuplicates`, sorted by (sha256_a, sha256_b)."""
    buckets: dict[tuple[int, int], list[Member]] = {}
    for member in members:
        for key in band_keys(member.perceptual_hash):
            buckets.setdefault(key, []).append(member)
    found = {(p.sha256_a, p.sha256_b): p for bucket in buckets.values()
             for p in pairs_in_bucket(bucket, threshold)}
    return [found[key] for key in sorted(found)]


def summarize(pairs: Iterable[NearDuplicatePair], threshold: int) -> dict:
    """The manifest's `near_duplicates` entry."""
    pairs = list(pairs)
    return {
        "path": PATH,
        "threshold": threshold,
        "pairs": len(pairs),
        "across_splits": sum(p.across_splits for p in pairs),
        "across_labels": sum(p.across_labels for p in pairs),
    }


def _member(image) -> Member | None:
    meta_hash = image.meta.perceptual_hash
    if meta_hash is None:
        return None
    return Member(meta_hash, image.sha256, image.split, tuple(image.labels),
                  established=bool(getattr(image, "reused", False)))


def moved_splits(pairs: Iterable[NearDuplicatePair]) -> dict[str, str]:
    """--near_duplicates keep_together: {sha256: split} for each new image that moves.

    A new image joins the split of its anchor among itself and its near-duplicates: an
    image an earlier output stored (whose split never changes) if it has one, else the
    smallest sha256. Direct near-duplicates only, not chains of them: a chain whose ends
    are far apart may still span splits, and the report lists what remains.
    """
    candidates: dict[str, set[tuple[bool, str, str]]] = {}
    for pair in pairs:
        sides = ((pair.established_a, pair.sha256_a, pair.split_a),
                 (pair.established_b, pair.sha256_b, pair.split_b))
        for (established, sha, split), (other_est, other, other_split) in (sides,
                                                                            sides[::-1]):
            if established:
                continue
            mine = candidates.setdefault(sha, {(True, sha, split)})
            # (not established, sha): earlier-stored images first, then by hash.
            mine.add((not other_est, other, other_split))
    moves = {}
    for sha, options in candidates.items():
        own_split = next(split for _, s, split in options if s == sha)
        anchor_split = min(options)[2]
        if anchor_split != own_split:
            moves[sha] = anchor_split
    return moves


class KeepTogether(beam.PTransform):
    """UniqueImage -> UniqueImage, new images moved into their anchor's split
    (`moved_splits`)."""

    def __init__(self, threshold: int):
        super().__init__()
        self._threshold = threshold

    def expand(self, unique_images):
        moves = (
            unique_images
            | "Find" >> FindNearDuplicates(self._threshold)
            | "Collect" >> beam.combiners.ToList()
            # {sha256: split}: only the images that move
            | "Anchors" >> beam.Map(moved_splits)
        )
        return unique_images | "Move" >> beam.Map(
            lambda image, moves: (dataclasses.replace(image, split=moves[image.sha256])
                                  if image.sha256 in moves else image),
            moves=beam.pvalue.AsSingleton(moves))


class FindNearDuplicates(beam.PTransform):
    """UniqueImage -> NearDuplicatePair, each pair once."""

    def __init__(self, threshold: int = DEFAULT_THRESHOLD):
        super().__init__()
        self._threshold = threshold

    def expand(self, unique_images):
        threshold = self._threshold
        return (
            unique_images
            | "ToMembers" >> beam.FlatMap(lambda image: [m for m in [_member(image)] if m])
            # ((band, key), Member), BANDS per image
            | "BandKeys" >> beam.FlatMap(
                lambda member: [(key, member) for key in band_keys(member.perceptual_hash)])
            | "GroupBuckets" >> beam.GroupByKey()
            | "PairsInBucket" >> beam.FlatMap(
                lambda keyed: pairs_in_bucket(keyed[1], threshold))
            # ((sha256_a, sha256_b), pair): the same pair from several bands, once
            | "KeyByPair" >> beam.Map(lambda pair: ((pair.sha256_a, pair.sha256_b), pair))
            | "GroupPairs" >> beam.GroupByKey()
            | "OnePerPair" >> beam.Map(lambda keyed: next(iter(keyed[1])))
        )

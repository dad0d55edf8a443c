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
  UniqueImage -> Member -> one list of every Member
  -> (`find_pairs`: per band, buckets of equal keys, candidate pairs checked exactly)
  -> one PairList of NearDuplicatePair (sha256_a < sha256_b), once however many keys agree
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
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


@dataclasses.dataclass(frozen=True, slots=True)  # slots: tens of thousands in one list
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

    def __reduce__(self):
        # The fields as a tuple: dataclass pickling calls `dataclasses.fields` per pair.
        return type(self), self._row()

    def _row(self) -> tuple:
        """Every field, in declaration order (a test holds it to `dataclasses.fields`)."""
        return (self.sha256_a, self.sha256_b, self.distance, self.split_a, self.split_b,
                self.labels_a, self.labels_b, self.established_a, self.established_b)

    def to_json(self) -> str:
        return json.dumps({"distance": self.distance, "labels_a": list(self.labels_a),
                           "labels_b": list(self.labels_b), "sha256_a": self.sha256_a,
                           "sha256_b": self.sha256_b, "split_a": self.split_a,
                           "split_b": self.split_b}, sort_keys=True)


class PairList(Sequence[NearDuplicatePair]):
    """Every pair of a run, as one value that crosses Beam's side inputs cheaply.

    The pairs side input can hold tens of thousands of pairs, and Beam's state cache weighs
    each side input it reads by walking every object in it (objsize), pair by pair and
    string by string. A PairList pickles as one blob of plain tuples and arrives packed,
    so the cache weighs one bytes object; the pairs are unpacked on first use. The cache
    counts the packed size only: unpacked pairs take about three times that, beside it.
    Equal to a PairList or tuple of the same pairs.
    """

    __slots__ = ("_pairs", "_packed")

    def __init__(self, pairs: Iterable[NearDuplicatePair] = ()):
        self._pairs: tuple[NearDuplicatePair, ...] | None = tuple(pairs)
        self._packed: bytes | None = None

    @classmethod
    def _from_packed(cls, packed: bytes) -> PairList:
        pair_list = cls.__new__(cls)
        pair_list._pairs, pair_list._packed = None, packed
        return pair_list

    def __reduce__(self):
        if self._packed is None:
            rows = [pair._row() for pair in self._unpacked()]
            self._packed = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
        return type(self)._from_packed, (self._packed,)

    def _unpacked(self) -> tuple[NearDuplicatePair, ...]:
        if self._pairs is None:
            self._pairs = tuple(NearDuplicatePair(*row) for row in pickle.loads(self._packed))
        return self._pairs

    def __len__(self) -> int:
        return len(self._unpacked())

    def __getitem__(self, index):
        return self._unpacked()[index]

    def __iter__(self) -> Iterator[NearDuplicatePair]:
        return iter(self._unpacked())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PairList | tuple):
            return self._unpacked() == tuple(other)
        return NotImplemented

    __hash__ = None  # a sequence compared by value

    def __repr__(self) -> str:
        return f"PairList({list(self._unpacked())!r})"


def band_keys(hashes: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Each hash's bits at one band's `positions`, as a number (uint64 in, uint64 out)."""
    keys = np.zeros_like(hashes)
    for position in positions:
        keys = (keys << np.uint64(1)) | ((hashes >> np.uint64(position)) & np.uint64(1))
    return keys


def recall_bound(distance: int, bands: int = BANDS, band_bits: int = BAND_BITS,
                 bits: int = PHASH_BITS) -> float:
    """The chance that two hashes `distance` bits apart share at least one band key, for
    bands that sample positions independently (ours are fixed samples: the average over
    which bits differ)."""
    same = math.comb(bits - distance, band_bits) / math.comb(bits, band_bits)
    return 1 - (1 - same) ** bands


def close_pairs_in_buckets(keys: np.ndarray, hashes: np.ndarray, threshold: int,
                           limit: int = MAX_BUCKET) -> tuple[np.ndarray, ...]:
    """(first, second, distance) index arrays, first < second, of every pair of images that
    share a key and whose hashes are within `threshold` bits. `hashes` are in the order a
    bucket is cut in: a bucket of more than `limit` images compares only its first `limit`.

    Most buckets hold a few images: those are compared all at once, one offset within the
    bucket at a time; the few large ones (look-alike images) each as a whole matrix. Each
    batch of candidates is checked as it is made, so memory holds the close pairs and one
    bucket's candidates, not every candidate of the band."""
    order = np.argsort(keys, kind="stable")  # stable: within a bucket, by index
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lengths = np.diff(np.r_[starts, len(keys)])
    sizes = np.minimum(lengths, limit)
    # For each place in `order`: its bucket, and how many members follow it within the cut.
    bucket = np.repeat(np.arange(len(starts)), lengths)
    following = sizes[bucket] - 1 - (np.arange(len(keys)) - starts[bucket])
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8))]

    def keep_close(first: np.ndarray, second: np.ndarray) -> None:
        distance = np.bitwise_count(hashes[first] ^ hashes[second])
        close = distance <= threshold
        found.append((first[close], second[close], distance[close]))

    places = np.flatnonzero((sizes[bucket] <= _SMALL_BUCKET) & (following >= 1))
    for offset in range(1, _SMALL_BUCKET):
        places = places[following[places] >= offset]
        keep_close(order[places], order[places + offset])
    for start, size in zip(starts[sizes > _SMALL_BUCKET], sizes[sizes > _SMALL_BUCKET],
                           strict=True):
        first, second = np.triu_indices(size, k=1)
        keep_close(order[start + first], order[start + second])
    return tuple(np.concatenate(column) for column in zip(*found, strict=True))


_SMALL_BUCKET = 16  # larger buckets are compared as a matrix each


def make_pair(first: Member, second: Member, distance: int) -> NearDuplicatePair:
    a, b = sorted((first, second), key=lambda member: member.sha256)
    return NearDuplicatePair(a.sha256, b.sha256, distance, a.split, b.split, a.labels,
                             b.labels, a.established, b.established)


def find_pairs(members: Sequence[Member], threshold: int = DEFAULT_THRESHOLD,
               limit: int = MAX_BUCKET) -> list[NearDuplicatePair]:
    """Every pair of `members` that shares a band key and lies within `threshold` bits,
    each once, sorted by (sha256_a, sha256_b). Buckets are cut to `limit` members in
    (hash, sha256) order."""
    members = sorted(members, key=lambda member: (member.perceptual_hash, member.sha256))
    hashes = np.fromiter((member.perceptual_hash for member in members), np.uint64,
                         count=len(members))
    firsts, seconds, distances = zip(*(
        close_pairs_in_buckets(band_keys(hashes, positions), hashes, threshold, limit)
        for positions in _BAND_POSITIONS), strict=True)
    # The same pair found by several bands, once.
    codes, once = np.unique(np.concatenate(firsts) * len(members) + np.concatenate(seconds),
                            return_index=True)
    distances = np.concatenate(distances)[once]
    pairs = [make_pair(members[code // len(members)], members[code % len(members)], distance)
             for code, distance in zip(codes.tolist(), distances.tolist(), strict=True)]
    return sorted(pairs, key=lambda pair: (pair.sha256_a, pair.sha256_b))


def summarize(pairs: Iterable[NearDuplicatePair], threshold: int) -> dict:
    """The manifest's `near_duplicates` entry."""
    pairs = list(pairs)
    return {
        "path": PATH,
        "threshold": threshold,
        "pairs": len(pairs),
        "across_splits": sum(p.across_splits for p in pairs),
        "across_labels": sum(p.across_labels for p in pairs),
        "anomalous": sum(p.across_splits or p.across_labels for p in pairs),
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
            # {sha256: split}: only the images that move
            | "Anchors" >> beam.Map(moved_splits)
        )
        return unique_images | "Move" >> beam.Map(
            lambda image, moves: (dataclasses.replace(image, split=moves[image.sha256])
                                  if image.sha256 in moves else image),
            moves=beam.pvalue.AsSingleton(moves))


class FindNearDuplicates(beam.PTransform):
    """UniqueImage -> one element: the PairList of every NearDuplicatePair, each once,
    sorted by (sha256_a, sha256_b).

    The search runs in one place over every image's hash (`find_pairs`, vectorised): the
    members travel once, as one list (about 150 bytes an image on the worker that
    searches), where keying each image by its `BANDS` band keys sent each through a
    shuffle that many times, and every pair through a second one.
    """

    def __init__(self, threshold: int = DEFAULT_THRESHOLD):
        super().__init__()
        self._threshold = threshold

    def expand(self, unique_images):
        threshold = self._threshold
        return (
            unique_images
            | "ToMembers" >> beam.FlatMap(lambda image: [m for m in [_member(image)] if m])
            | "CollectMembers" >> beam.combiners.ToList()
            | "Search" >> beam.Map(lambda members: PairList(find_pairs(members, threshold)))
        )

"""Deterministic splits and balanced shards, decided from content hashes alone.

A split is a pure function of (salt, content hash): reruns, added images and
duplicates never move an image, and identical content can never land in two
splits. Within a split the records are ordered by a second salted hash (a fixed
pseudo-random shuffle) and dealt round-robin to shards, so shard sizes differ by
at most one and every shard's class mix is a random sample of the split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

_UNIT = float(1 << 64)


def salted_fraction(salt: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, key)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _UNIT


def assign_split(content_sha256: str, splits: Sequence[tuple[str, float]], salt: str) -> str:
    """The split of one content hash, by cumulative fractions of `splits`."""
    point = salted_fraction(salt, content_sha256)
    cumulative = 0.0
    for name, fraction in splits:
        cumulative += fraction
        if point < cumulative:
            return name
    return splits[-1][0]  # float rounding at the very top of the range


def order_key(content_sha256: str, salt: str) -> str:
    """Sort key that shuffles records within a split, the same way every run."""
    return hashlib.sha256(f"{salt}\x00order\x00{content_sha256}".encode()).hexdigest()


def shard_count(
    split: str,
    num_examples: int,
    num_bytes: int,
    splits: Sequence[tuple[str, float]],
    num_shards: int | None,
    shard_size_mb: float,
) -> int:
    """How many shards a split gets: from --num_shards (train; others scaled) or by bytes.

    Never more shards than examples, never fewer than one.
    """
    if num_examples == 0:
        return 0
    if num_shards is not None:
        fractions = dict(splits)
        reference = fractions.get("train", max(fractions.values()))
        wanted = max(1, round(num_shards * fractions[split] / reference))
    else:
        wanted = max(1, math.ceil(num_bytes / (shard_size_mb * (1 << 20))))
    return min(wanted, num_examples)


def deal_round_robin(ordered: Sequence, num_shards: int) -> list[list]:
    """Deals already-shuffled items to `num_shards` lists; sizes differ by at most one."""
    return [list(ordered[index::num_shards]) for index in range(num_shards)]


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def split_of_shard(path: str) -> str:
    """The split a shard file (a path ending in a `shard_name`) holds."""
    return path.rsplit("/", 1)[-1].rsplit("-", 3)[0]

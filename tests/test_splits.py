"""Content-hash splits and balanced shards: pure functions, golden values."""

import hashlib
from collections import Counter

from pipelines.preprocessing import splits

SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_split_is_a_pure_function_of_salt_and_content():
    assert splits.assign_split(sha(1), SPLITS, "s") == splits.assign_split(sha(1), SPLITS, "s")
    # Golden values: if this changes, users' images move between splits.
    got = [splits.assign_split(sha(i), SPLITS, "imagebeam-split-v1") for i in range(8)]
    assert got == ["train", "train", "train", "validation", "train", "test", "train", "train"]


def test_split_fractions_hold_on_many_items():
    counts = Counter(splits.assign_split(sha(i), SPLITS, "salt") for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.8) < 0.01
    assert abs(counts["test"] / 20000 - 0.1) < 0.01


def test_adding_items_never_moves_existing_ones():
    before = {i: splits.assign_split(sha(i), SPLITS, "salt") for i in range(500)}
    after = {i: splits.assign_split(sha(i), SPLITS, "salt") for i in range(1000)}
    assert all(after[i] == before[i] for i in before)


def test_round_robin_balances_within_one():
    for n_items in (0, 1, 7, 100, 101):
        for n_shards in (1, 3, 8):
            sizes = [len(s) for s in splits.deal_round_robin(list(range(n_items)), n_shards)]
            assert sum(sizes) == n_items and max(sizes) - min(sizes) <= 1


def test_shard_count_scales_other_splits_and_caps_at_examples():
    assert splits.shard_count("train", 1000, 0, SPLITS, 8, 128) == 8
    assert splits.shard_count("test", 1000, 0, SPLITS, 8, 128) == 1
    assert splits.shard_count("test", 3, 0, SPLITS, 80, 128) == 3
    assert splits.shard_count("train", 0, 0, SPLITS, 8, 128) == 0
    assert splits.shard_count("train", 10**6, 300 << 20, SPLITS, None, 128) == 3

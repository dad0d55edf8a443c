"""The trainer's epoch order, in NumPy: every record once, uniform over examples.

The same scheme as `trainer.input.uniform_schedule` (its docstring has the reasons):
each epoch draws shard ids in blocks of `SCHEDULE_BLOCK`, shard i with probability
remaining_i / remaining; each shard is read front to back; a draw of an exhausted shard
(a phantom, near the end of an epoch) is skipped. So any prefix of an epoch holds the
shards in proportion to their sizes, and reads stay sequential within a shard. Seeded by
(seed, epoch) with NumPy's generator: the same distribution as the trainer's, not the
same sequence (that one is TensorFlow's stateless RNG).

Per-worker sharding is the trainer's too (`trainer.input.worker_shards`): worker k of n
takes shards k, k+n, ...; with fewer shards than workers every worker computes the same
order over all shards and takes every n-th record of it. Either way the workers'
records are disjoint and together the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCHEDULE_BLOCK = 128  # shard draws per block, as the trainer's


def uniform_schedule(counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """(shard id, position in shard) of every record of shards with `counts` records,
    in a uniform-over-examples order. int64 [sum(counts), 2]."""
    counts = np.asarray(counts, dtype=np.int64)
    remaining = counts.copy()
    taken = np.zeros_like(counts)
    order = []
    while (left := int(remaining.sum())) > 0:
        picks = rng.choice(len(counts), size=min(left, SCHEDULE_BLOCK),
                           p=remaining / left)
        remaining = np.maximum(remaining - np.bincount(picks, minlength=len(counts)), 0)
        for shard in picks:
            # remaining == counts - taken after each block, so the loop ends with every
            # record taken; a pick of an exhausted shard is a phantom: skipped.
            if taken[shard] < counts[shard]:
                order.append((shard, taken[shard]))
                taken[shard] += 1
    return np.asarray(order, dtype=np.int64).reshape(-1, 2)


def worker_shards(num_shards: int, worker_index: int, num_workers: int
                  ) -> tuple[list[int], bool]:
    """This worker's shard ids, and whether it must instead take every num_workers-th
    record of all of them (fewer shards than workers)."""
    if not 0 <= worker_index < max(num_workers, 1):
        raise ValueError(f"worker_index {worker_index} is not in [0, {num_workers})")
    if num_workers <= 1:
        return list(range(num_shards)), False
    if num_shards < num_workers:
        return list(range(num_shards)), True
    return list(range(worker_index, num_shards, num_workers)), False


def epoch_order(counts: Sequence[int], *, seed: int, epoch: int, worker_index: int = 0,
                num_workers: int = 1) -> np.ndarray:
    """Global record indices (shards concatenated in `counts` order) that worker
    `worker_index` of `num_workers` reads in `epoch`. int64 [records of this worker]."""
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    shards, by_record = worker_shards(len(counts), worker_index, num_workers)
    rng = np.random.default_rng([seed, epoch])
    schedule = uniform_schedule([counts[s] for s in shards], rng)
    indices = starts[np.asarray(shards, dtype=np.int64)[schedule[:, 0]]] + schedule[:, 1]
    return indices[worker_index::num_workers] if by_record else indices

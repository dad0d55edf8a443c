"""Which shard each draw of an epoch comes from: naive file interleave vs `epoch_records`.

    .venv/bin/python -m tests.benchmarks.sampling_uniformity [--sizes 1000 2000 3000] [--seeds 5]

Three TFRecord shards of unequal sizes (1,000 / 2,000 / 3,000 tiny records, each
naming its shard and index) are read for one epoch by:

- interleave: `from_tensor_slices(files).interleave(TFRecordDataset,
  cycle_length=len(files))`, files in size order: the common tf.data recipe;
- shuffle(files) + interleave: the same after `.shuffle(len(files), seed)`;
- the same with `num_parallel_calls=AUTOTUNE, deterministic=False`;
- ours: `trainer.input.epoch_records(shards, _epoch_seed(seed, 0))`.

Uniform sampling over records means any window of the epoch holds the shards in
proportion to their sizes (16.7% / 33.3% / 50.0%). Each reader's shares in the first
10%, the first half and the last 10% of the epoch are averaged over `--seeds` seeds
(the file-shuffle seed for the naive readers, the schedule seed for ours); `max dev`
is the largest |share - expected| in those windows, `worst prefix` the largest over
every prefix from 10% of the epoch on (both per seed, then the worst seed). `once`
checks that every record came exactly once in every seed's epoch.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer import input as input_lib

WINDOWS = ("first 10%", "first half", "last 10%")


def write_shards(directory: Path, sizes: list[int]) -> tuple[input_lib.Shard, ...]:
    """One TFRecord file per size; record j of shard i is b"i:j" (attributable)."""
    shards = []
    for shard, size in enumerate(sizes):
        path = str(directory / f"train-{shard:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for index in range(size):
                writer.write(f"{shard}:{index}".encode())
        shards.append(input_lib.Shard(path, size, os.path.getsize(path)))
    return tuple(shards)


def naive(files: list[str], seed: int | None, parallel: bool) -> tf.data.Dataset:
    """The usual recipe; `seed` None keeps the files in the order given."""
    names = tf.data.Dataset.from_tensor_slices(files)
    if seed is not None:
        names = names.shuffle(len(files), seed=seed)
    if parallel:
        return names.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return names.interleave(tf.data.TFRecordDataset, cycle_length=len(files))


def one_epoch(dataset: tf.data.Dataset) -> list[bytes]:
    # One batch of the whole epoch: one Python round trip instead of 6,000.
    return list(dataset.batch(1 << 30).get_single_element().numpy())


def window_shares(shard_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """[window, shard] share of draws in each of WINDOWS."""
    tenth, half = len(shard_ids) // 10, len(shard_ids) // 2
    windows = (shard_ids[:tenth], shard_ids[:half], shard_ids[-tenth:])
    return np.stack([np.bincount(w, minlength=num_shards) / len(w) for w in windows])


def worst_prefix(shard_ids: np.ndarray, expected: np.ndarray) -> float:
    """Largest |share - expected| over every prefix from 10% of the epoch on."""
    counts = np.cumsum(np.eye(len(expected))[shard_ids], axis=0)
    shares = counts / np.arange(1, len(shard_ids) + 1)[:, None]
    return float(np.abs(shares[len(shard_ids) // 10 - 1:] - expected).max())


def measure(read: Callable[[int], tf.data.Dataset], seeds: int, sizes: list[int]
            ) -> tuple[np.ndarray, float, float, bool]:
    """(mean [window, shard] shares, max dev, worst prefix, every record once) over seeds."""
    expected = np.array(sizes) / sum(sizes)
    every_record = sorted(f"{i}:{j}".encode() for i, n in enumerate(sizes) for j in range(n))
    shares, max_dev, prefix_dev, once = [], 0.0, 0.0, True
    for seed in range(seeds):
        drawn = one_epoch(read(seed))
        shard_ids = np.array([int(record.split(b":")[0]) for record in drawn])
        shares.append(window_shares(shard_ids, len(sizes)))
        max_dev = max(max_dev, float(np.abs(shares[-1] - expected).max()))
        prefix_dev = max(prefix_dev, worst_prefix(shard_ids, expected))
        once = once and sorted(drawn) == every_record
    return np.mean(shares, axis=0), max_dev, prefix_dev, once


def percent(shares: np.ndarray) -> str:
    return "/".join(f"{100 * s:.1f}" for s in shares)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 3000])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        shards = write_shards(Path(directory), args.sizes)
        files = [s.path for s in shards]
        readers = {
            "interleave, files in size order": lambda seed: naive(files, None, False),
            "shuffle(files) + interleave": lambda seed: naive(files, seed, False),
            "  + AUTOTUNE, deterministic=False": lambda seed: naive(files, seed, True),
            "ours: epoch_records": lambda seed: input_lib.epoch_records(
                shards, input_lib._epoch_seed(seed, 0)),
        }
        results = {name: measure(read, args.seeds, args.sizes) for name, read in readers.items()}
    expected = np.array(args.sizes) / sum(args.sizes)
    width = max(17, len(percent(expected)))
    print(f"shards: {' / '.join(map(str, args.sizes))} records, one epoch of {sum(args.sizes)}, "
          f"{args.seeds} seeds; shares in % per shard, expected {percent(expected)}")
    print(f"{'reader':34s} " + " ".join(f"{w:>{width}s}" for w in WINDOWS)
          + f" {'max dev':>8s} {'worst prefix':>13s} {'once':>5s}")
    for name, (shares, max_dev, prefix_dev, once) in results.items():
        print(f"{name:34s} " + " ".join(f"{percent(s):>{width}s}" for s in shares)
              + f" {100 * max_dev:7.1f}% {100 * prefix_dev:12.1f}% {'yes' if once else 'NO':>5s}")
    print("interleave takes one record per open file in turn: 1:1:1 until the small shard "
          "runs dry, then only big shards; ours draws shards by records left, so every window "
          "is 1:2:3 (devs: worst seed, percentage points)")


if __name__ == "__main__":
    main()

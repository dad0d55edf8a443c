"""pipelines.dataset (no TensorFlow) against the trainer's tf.data read of the same shards.

    .venv/bin/python -m tests.benchmarks.dataset_reader [--images 500] [--image_size 224]
        [--gcs]

Prints images/s of: the trainer's evaluation input (tf.data, parse + decode, AUTOTUNE:
the baseline), `ImageShards` in file order, in a random order (one ranged read per
record), one `epoch(...)`, Grain's DataLoader over `GrainSource` (2 worker processes,
their start timed apart), and with --gcs the random-order read from fake-gcs-server.
One Python thread for `ImageShards`: it is a per-record API; a loader's workers are what
parallelise it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

import numpy as np

from pipelines.contract.manifest import read_manifest
from pipelines.dataset import GrainSource, ImageShards
from tests.benchmarks.preprocess_throughput import CACHE, photo_corpus


def prepared(count: int, image_size: int) -> str:
    """A cached output of ~`count` photos, all in train (made with the record index)."""
    out = CACHE / f"prep-reader-{count}-{image_size}"
    if not (out / "manifest.json").exists() or not (out / "index" / "shards").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input",
                        str(photo_corpus(count)), "--output", str(out), "--image_size",
                        str(image_size), "--splits", "train=1", "--no_progress"], check=True)
    return str(out)


def rate(label: str, count: int, seconds: float) -> None:
    print(f"{label:<44} {count / seconds:>9.0f} images/s  ({seconds:.2f} s)", flush=True)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def trainer_baseline(root: str) -> tuple[int, float]:
    import tensorflow as tf

    from trainer import input as input_lib

    spec = input_lib.DataSpec.from_manifest(root, read_manifest(root))
    dataset = input_lib.eval_dataset(spec, "train", 64)
    for _ in dataset.take(1):  # graph building and the first file open, not measured
        pass
    count = spec.num_examples("train")
    return count, timed(lambda: [tf.size(images) for images, _ in dataset])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--gcs", action="store_true", help="also read from fake-gcs-server")
    args = parser.parse_args(argv)
    root = prepared(args.images, args.image_size)
    ds = ImageShards(root, "train")
    n = len(ds)
    print(f"{n} images at {args.image_size} px, {len(ds.shard_paths)} shards", flush=True)

    rate("trainer eval input (tf.data, baseline)", *trainer_baseline(root))
    rate("ImageShards, file order", n, timed(lambda: [ds[i] for i in range(n)]))
    permutation = np.random.default_rng(0).permutation(n).tolist()
    fresh = ImageShards(root, "train")
    rate("ImageShards, random order (fresh index)", n,
         timed(lambda: [fresh[i] for i in permutation]))
    rate("ImageShards.epoch (trainer's order)", n, timed(lambda: list(ds.epoch(0, seed=1))))
    startup, rest, after_first = _grain(ds)
    print(f"Grain DataLoader, 2 workers: first batch after {startup:.1f} s (worker start)")
    rate("Grain DataLoader, 2 workers, after batch 1", after_first, rest)
    if args.gcs:
        from tests.support.gcs_emulator import GcsEmulator

        with GcsEmulator() as emulator:
            emulator.create_bucket("bench")
            emulator.upload_folder(root, "gs://bench/prep")
            remote = ImageShards("gs://bench/prep", "train")
            sample = permutation[: min(n, 200)]
            rate("ImageShards gs:// (emulator), random order", len(sample),
                 timed(lambda: [remote[i] for i in sample]))
    return 0


def _grain(ds: ImageShards) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for the rest, images in the rest)."""
    import grain.python as grain

    loader = grain.DataLoader(
        data_source=GrainSource(ds),
        sampler=grain.IndexSampler(len(ds), grain.NoSharding(), shuffle=True, num_epochs=1,
                                   seed=0),
        operations=[grain.Batch(32)], worker_count=2)
    started = time.perf_counter()
    batches = iter(loader)
    next(batches)
    startup = time.perf_counter() - started
    rest = sum(len(batch["sha256"]) for batch in batches)
    return startup, time.perf_counter() - started - startup, rest


if __name__ == "__main__":
    sys.exit(main())

"""Epochs of the linear probe: our shards vs `image_dataset_from_directory` on the raw JPEGs.

    .venv/bin/python -m tests.benchmarks.trainer_vs_keras [--images 2000] [--rounds 3]

Every side trains the same `--model linear` (pool, normalise, dense: it costs next to
nothing, so the input pipeline is what is timed) at 224x224, batch 32, in this one
process, on the same ~2000 images (500x375 JPEG crops of real photos; our sides read
the preprocess output of exactly those files, every image in `train`):

- keras: `image_dataset_from_directory(raw) .prefetch()`: decodes and resizes every
  raw JPEG every epoch;
- ours: `trainer.input.train_dataset` over the default shards (224 px JPEG, quality 90);
- ours, PNG shards: the same over `--image_format png` shards (lossless, decoded);
- ours, raw shards: the same over `--image_format raw` shards (no decode at all);
- ours, cache: default shards with `--cache memory` (decoded once, epoch 1 excluded).

And the decode limit of the stored format: a loop that only decodes the train split's
stored JPEGs, held in memory, with libjpeg-turbo (simplejpeg; ISLOW and fancy upsampling,
as the trainer's `decode_jpeg`) in one process per core, and TensorFlow's own decode of the
same bytes in tf.data, batched as the input decodes them. "Input alone" of the default shards
is compared with both: the first is the format's limit on these cores, the second separates
what the rest of the input (reading, parsing, shuffling) costs from TensorFlow's decoder.

A shared machine's load swings, so the sides take turns, `--rounds` times; each
reports its best epoch in images per wall-clock second, and its median epoch in
images per CPU-second of this process (robust to other load; on an idle machine
wall-clock rate ~ cores x CPU rate when the input keeps every core busy). Epoch 1 of
each fit (tracing, buffer filling) is left out. Ratios are to keras.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import multiprocessing
import resource
import time
from collections import defaultdict
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipelines.contract import records
from pipelines.contract.manifest import read_manifest
from tests.benchmarks.trainer_data import prepared
from trainer import input as input_lib
from trainer.config import DEFAULT_STEPS_PER_EXECUTION
from trainer.model import make_model

BATCH = 32
SIZE = 224


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


class EpochTimes(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = (time.perf_counter(), cpu_seconds())

    def on_epoch_end(self, epoch, logs=None):
        wall, cpu = self._started
        self.seconds.append((time.perf_counter() - wall, cpu_seconds() - cpu))


def epoch_seconds(dataset, steps: int | None, epochs: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of epochs 2.. of fitting the linear probe on `dataset`."""
    model = make_model("linear", (SIZE, SIZE, 3), 4, np.full(3, 120.0), np.full(3, 60.0))
    # Both sides compile as trainer.task does by default (steps_per_execution included).
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=False,
                  steps_per_execution=DEFAULT_STEPS_PER_EXECUTION)
    timer = EpochTimes()
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=[timer], verbose=0,
              shuffle=False)
    return timer.seconds[1:]


def input_only_seconds(dataset, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds to pull `steps` batches with no model: the rate a host whose
    model runs on an accelerator could feed it (after a warm-up epoch, as fit's first
    epoch is left out)."""
    batches = iter(dataset)
    for _ in range(steps):
        next(batches)
    started = (time.perf_counter(), cpu_seconds())
    for _ in range(steps):
        next(batches)
    return time.perf_counter() - started[0], cpu_seconds() - started[1]


def stored_jpegs(spec: input_lib.DataSpec, split: str = "train") -> list[bytes]:
    """The stored image bytes of every record of `split`."""
    encoded = []
    for shard in spec.splits[split]:
        with Path(shard.path).open("rb") as handle:
            encoded += [records.parse_example(r)[records.ENCODED][0]
                        for r in records.read_records(handle)]
    return encoded


def _decode_all(chunk: list[bytes]) -> int:
    import simplejpeg

    for data in chunk:
        simplejpeg.decode_jpeg(data)
    return len(chunk)


def decode_limit(encoded: list[bytes], rounds: int) -> float:
    """Best images/s of decoding `encoded` in one process per core, nothing else."""
    cores = os.cpu_count() or 1
    chunks = [encoded[i::cores] for i in range(cores)]
    best = 0.0
    # spawn: this process has loaded TensorFlow, which a fork must not copy.
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.map(_decode_all, chunks)  # warm up: imports, page faults
        for _ in range(rounds):
            started = time.perf_counter()
            pool.map(_decode_all, chunks)
            best = max(best, len(encoded) / (time.perf_counter() - started))
    return best


def tf_decode_limit(encoded: list[bytes], rounds: int) -> float:
    """Best images/s of TensorFlow decoding `encoded`, held in memory, in batches exactly
    as the input decodes them (`decode_stored`), and nothing else: no files, no parsing,
    no shuffle."""
    batches = (tf.data.Dataset.from_tensor_slices(encoded).batch(BATCH)
               .map(lambda batch: input_lib.decode_stored(batch, "jpeg", SIZE, SIZE),
                    num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
    best = 0.0
    for _ in range(rounds + 1):  # the first pass traces and warms up
        started = time.perf_counter()
        for _ in batches:
            pass
        best = max(best, len(encoded) / (time.perf_counter() - started))
    return best


def print_storage(raw, specs: dict[str, input_lib.DataSpec]) -> None:
    """Bytes on disk per image: the other half of the shard format choice."""
    files = list(raw.rglob("*.jpg"))
    source = sum(p.stat().st_size for p in files) / len(files)
    sizes = {name: spec.record_bytes("train") for name, spec in specs.items()}
    print(f"bytes per image: source JPEGs {source / 1024:.1f} KiB; shards " + ", ".join(
        f"{name} {size / 1024:.1f} KiB ({size / source:.2f}x)" for name, size in sizes.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per fit (the first is dropped)")
    args = parser.parse_args(argv)
    raw, jpeg_prep = prepared(args.images, SIZE)
    outputs = {"jpeg": jpeg_prep, "png": prepared(args.images, SIZE, "png")[1],
               "raw": prepared(args.images, SIZE, "raw")[1]}
    specs = {name: input_lib.DataSpec.from_manifest(str(p), read_manifest(str(p)))
             for name, p in outputs.items()}
    images = specs["jpeg"].num_examples("train")
    steps = input_lib.steps_per_epoch(images, BATCH)
    for path in raw.rglob("*.jpg"):  # every side starts from the page cache
        path.read_bytes()

    def keras_loader():
        loader = keras.utils.image_dataset_from_directory(
            str(raw), image_size=(SIZE, SIZE), batch_size=BATCH, shuffle=True, seed=0,
            verbose=False)
        # Same model input (uint8) for every side; the cast is noise next to decoding.
        return loader.map(lambda x, y: (tf.cast(x, tf.uint8), y),
                          num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    sides = {
        "keras image_dataset_from_directory": lambda: (keras_loader(), None, images),
        "ours, JPEG shards (default)": lambda: (
            input_lib.train_dataset(specs["jpeg"], BATCH), steps, steps * BATCH),
        "ours, PNG shards (--image_format png)": lambda: (
            input_lib.train_dataset(specs["png"], BATCH), steps, steps * BATCH),
        "ours, raw shards (--image_format raw)": lambda: (
            input_lib.train_dataset(specs["raw"], BATCH), steps, steps * BATCH),
        "ours, JPEG shards, --cache memory": lambda: (
            input_lib.train_dataset(specs["jpeg"], BATCH, cache="memory"), steps, steps * BATCH),
    }
    best: dict[str, float] = defaultdict(float)  # images per wall second
    per_cpu: dict[str, list[float]] = defaultdict(list)  # images per CPU second
    feed: dict[str, float] = defaultdict(float)  # input alone, images per wall second
    for _ in range(args.rounds):
        for name, make in sides.items():
            dataset, fit_steps, seen = make()
            for wall, cpu in epoch_seconds(dataset, fit_steps, args.epochs):
                best[name] = max(best[name], seen / wall)
                per_cpu[name].append(seen / cpu)
            wall, _ = input_only_seconds(make()[0].repeat(), steps)
            feed[name] = max(feed[name], steps * BATCH / wall)
    print(f"cores: {os.cpu_count()}, images: {images} (500x375 JPEG -> {SIZE}x{SIZE}), "
          f"batch {BATCH}, linear probe, {args.rounds} rounds; load average now "
          f"{os.getloadavg()[0]:.1f}")
    keras_name = next(iter(sides))
    base_wall, base_cpu = best[keras_name], float(np.median(per_cpu[keras_name]))
    print(f"{'input':40s} {'images/s':>9s} {'ratio':>6s} {'images/CPU-s':>13s} {'ratio':>6s} "
          f"{'input alone':>12s} {'ratio':>6s}")
    for name in sides:
        cpu_rate = float(np.median(per_cpu[name]))
        print(f"{name:40s} {best[name]:9.0f} {best[name] / base_wall:6.2f} {cpu_rate:13.0f} "
              f"{cpu_rate / base_cpu:6.2f} {feed[name]:12.0f} {feed[name] / feed[keras_name]:6.2f}")
    encoded = stored_jpegs(specs["jpeg"])
    limit, tf_limit = decode_limit(encoded, args.rounds), tf_decode_limit(encoded, args.rounds)
    ours = feed["ours, JPEG shards (default)"]
    print(f"decode-only loops over the stored JPEGs: simplejpeg in {os.cpu_count()} processes "
          f"{limit:.0f} images/s, TensorFlow's decode_jpeg in tf.data {tf_limit:.0f}; the default "
          f"shards' input alone {ours:.0f} = {ours / limit:.2f} of the first, "
          f"{ours / tf_limit:.2f} of the second")
    print_storage(raw, specs)
    print("images/s: best epoch (wall clock); images/CPU-s: median epoch, images per second "
          "of CPU used by this process (what a busy machine does not distort); input alone: "
          "best images/s of the input with no model (what a host feeding a GPU gets)")


if __name__ == "__main__":
    main()

"""Input images/s with --augment none, light and strong, beside the train step's own rate.

    .venv/bin/python -m tests.benchmarks.trainer_augment [--per_class 40] [--image_size 64]
        [--batches 30] [--model small_cnn]

The trainer's own train input (`trainer.train._train_input`: read, shuffle, decode,
augment in tf.data) is drained alone for each preset after a warm-up; then the model's
train step runs alone on one cached batch. Augmentation is where it belongs while the
input's images/s stays above the step's (the model never waits for it); the baseline is
`none` in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.benchmarks.trainer_quality import photo_set


def input_rate(config, spec, batches: int) -> float:
    from trainer import input as input_lib
    from trainer import train

    steps = input_lib.steps_per_epoch(spec.num_examples("train"), config.batch_size)
    epochs = -(-(batches + 3) // steps)
    dataset = iter(train._train_input(config, spec, 0, epochs)(None))
    for _ in range(3):  # warm-up: tracing, buffers
        next(dataset)
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        images += int(next(dataset)[0].shape[0])
    return images / (time.perf_counter() - started)


def step_rate(config, spec, batches: int) -> float:
    import keras

    from trainer import train
    from trainer.model import make_model

    norm = train.load_normalization(spec)
    model = make_model(config.model, (spec.height, spec.width, 3), len(spec.labels),
                       norm["mean"], norm["std"])
    train._compile(model, keras.optimizers.Adam(1e-3), False, 1)
    images, labels = next(iter(train._train_input(config, spec, 0, 1)(None)))
    for _ in range(3):
        model.train_on_batch(images, labels)
    started = time.perf_counter()
    for _ in range(batches):
        model.train_on_batch(images, labels)
    return batches * int(images.shape[0]) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per_class", type=int, default=40)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--model", default="small_cnn")
    args = parser.parse_args()
    from pipelines.contract.manifest import read_manifest
    from trainer import config as config_lib
    from trainer import input as input_lib

    with tempfile.TemporaryDirectory() as tmp:
        data = photo_set(Path(tmp), None, args.per_class, seed=5)
        spec = input_lib.DataSpec.from_manifest(str(data), read_manifest(str(data)))

        def config(augment):
            return config_lib.parse_args(
                ["--data", str(data), "--model_dir", tmp, "--batch_size", str(args.batch_size),
                 "--model", args.model, "--augment", augment], {})
        print(f"{spec.num_examples('train')} train images at {spec.height} px, batch "
              f"{args.batch_size}, {args.batches} batches each")
        for augment in ("none", "light", "strong"):
            rate = input_rate(config(augment), spec, args.batches)
            print(f"input, --augment {augment:>6}: {rate:8.1f} images/s")
        rate = step_rate(config("none"), spec, args.batches)
        print(f"train step of {args.model} alone: {rate:8.1f} images/s")


if __name__ == "__main__":
    main()

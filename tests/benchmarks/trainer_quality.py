"""Fine-tuning pays: test accuracy from scratch vs fine-tuned from a weights file made here.

    .venv/bin/python -m tests.benchmarks.trainer_quality [--epochs 6] [--per_class 50]
        [--seeds 0,1,2] [--unrecorded]

Pre-training set A: crops of four scikit-image photos the demo does not use
(immunohistochemistry, hubble_deep_field, retina, colorwheel), 60 a class. Target set B:
the demo's four photos (astronaut, cat, coffee, rocket), `--per_class` a class, another
crop seed, split train/validation/test 0.6/0.1/0.3 so the test split is not a handful.
MobileNetV3-Small at 64 px is trained from scratch on A; the trainer writes its backbone as
`backbone.weights.h5`, recording the input scaling it learnt with. Then on B, for the same
number of epochs and each trainer `--seed`: from scratch (`--weights none`) and fine-tuned
(`--weights FILE --freeze_epochs 2`). Prints test accuracy and loss per run and the medians.

`--unrecorded` adds, for the first seed, a fine-tuned run from the same file with the record
removed: what the trainer did before weights files recorded their scaling (the application's
own [-1, 1] rescaling in front of weights that learnt on mean/std-normalised pixels).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import demo_data

PRETRAIN_SOURCES = {"cells": "immunohistochemistry", "galaxies": "hubble_deep_field",
                    "retina": "retina", "colours": "colorwheel"}
MODEL = "mobilenet_v3_small"
B_SPLITS = "train=0.6,validation=0.1,test=0.3"


def photo_set(root: Path, sources: dict[str, str] | None, per_class: int, seed: int,
              splits: str | None = None) -> Path:
    """Crops of `sources` (None: the demo's) through the project's preprocess, at 64 px."""
    raw, output = root / "raw", root / "prep"
    saved = demo_data.SOURCES
    try:
        demo_data.SOURCES = sources or saved
        demo_data.make_demo_images(str(raw), per_class=per_class, size=(150, 200), seed=seed)
    finally:
        demo_data.SOURCES = saved
    subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input", str(raw),
                    "--output", str(output), "--image_size", "64", "--num_shards", "2",
                    "--no_progress", *(["--splits", splits] if splits else [])],
                   check=True, capture_output=True)
    return output


def train(data: Path, model_dir: Path, epochs: int, seed: int, *flags: str) -> tuple[dict, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer.task", "--data", str(data), "--model_dir",
                    str(model_dir), "--model", MODEL, "--epochs", str(epochs), "--batch_size",
                    "16", "--progress", "off", "--seed", str(seed), *flags], check=True,
                   capture_output=True)
    return (json.loads((model_dir / "metrics.json").read_text()),
            time.perf_counter() - started)


def without_record(weights: Path, path: Path) -> Path:
    """A copy of `weights` without the input scaling it records."""
    import h5py

    from trainer.model import SCALING_ATTRIBUTE

    shutil.copyfile(weights, path)
    with h5py.File(path, "a") as file:
        del file.attrs[SCALING_ATTRIBUTE]
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrain_epochs", type=int, default=8)
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--unrecorded", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = photo_set(root / "a", PRETRAIN_SOURCES, 60, seed=3)
        b = photo_set(root / "b", None, args.per_class, seed=4, splits=B_SPLITS)
        pretrained, seconds = train(a, root / "pretrain", args.pretrain_epochs, 0)
        weights = Path(pretrained["backbone_weights"])
        print(f"pre-training on A, {args.pretrain_epochs} epochs: test accuracy "
              f"{pretrained['test']['accuracy']:.3f} ({seconds:.0f} s); scaling recorded: "
              f"{pretrained['input_scaling']}", flush=True)
        arms = {"from scratch": ["--weights", "none"],
                "fine-tuned": ["--weights", str(weights), "--freeze_epochs", "2"]}
        results: dict[str, list[float]] = {name: [] for name in arms}
        for seed in seeds:
            runs = dict(arms)
            if args.unrecorded and seed == seeds[0]:
                runs["fine-tuned, unrecorded"] = [
                    "--weights", str(without_record(weights, root / "unrecorded.weights.h5")),
                    "--freeze_epochs", "2"]
            for name, flags in runs.items():
                model_dir = root / f"{name.replace(' ', '_').replace(',', '')}_{seed}"
                metrics, seconds = train(b, model_dir, args.epochs, seed, *flags)
                test = metrics["test"]
                results.setdefault(name, []).append(test["accuracy"])
                print(f"seed {seed} {name:>22} on B, {args.epochs} epochs: test accuracy "
                      f"{test['accuracy']:.3f} (n={sum(map(sum, test['confusion_matrix']))}), "
                      f"loss {test['loss']:.3f}, input {metrics['input_scaling']} "
                      f"({seconds:.0f} s)", flush=True)
        for name, accuracies in results.items():
            print(f"median test accuracy {name:>22}: {statistics.median(accuracies):.3f} "
                  f"over seeds {seeds[:len(accuracies)]}: {accuracies}")


if __name__ == "__main__":
    main()

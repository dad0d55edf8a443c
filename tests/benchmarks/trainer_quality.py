"""Fine-tuning pays: test accuracy from scratch vs fine-tuned from a weights file made here.

    .venv/bin/python -m tests.benchmarks.trainer_quality [--epochs 6] [--per_class 20]

Pre-training set A: crops of four scikit-image photos the demo does not use
(immunohistochemistry, hubble_deep_field, retina, colorwheel), 60 a class. Target set B:
the demo's four photos (astronaut, cat, coffee, rocket), `--per_class` a class, another
seed. MobileNetV3-Small at 64 px is trained from scratch on A, its backbone saved as a
`.weights.h5` file; then on B, for the same number of epochs, once from scratch
(`--weights none`) and once fine-tuned (`--weights FILE --freeze_epochs 2`). Prints
test accuracy (and loss) of both, and the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import demo_data

PRETRAIN_SOURCES = {"cells": "immunohistochemistry", "galaxies": "hubble_deep_field",
                    "retina": "retina", "colours": "colorwheel"}
MODEL = "mobilenet_v3_small"


def photo_set(root: Path, sources: dict[str, str] | None, per_class: int, seed: int) -> Path:
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
                    "--no_progress"], check=True, capture_output=True)
    return output


def train(data: Path, model_dir: Path, epochs: int, *flags: str) -> tuple[dict, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer.task", "--data", str(data), "--model_dir",
                    str(model_dir), "--model", MODEL, "--epochs", str(epochs), "--batch_size",
                    "16", "--progress", "off", "--seed", "0", *flags], check=True,
                   capture_output=True)
    return (json.loads((model_dir / "metrics.json").read_text()),
            time.perf_counter() - started)


def save_backbone(data: Path, model_dir: Path, path: Path) -> None:
    """The trained backbone of the run in `model_dir` as a weights file."""
    from pipelines.contract.manifest import read_manifest
    from trainer import input as input_lib
    from trainer import train as train_lib
    from trainer.model import make_model

    spec = input_lib.DataSpec.from_manifest(str(data), read_manifest(str(data)))
    norm = train_lib.load_normalization(spec)
    model = make_model(MODEL, (64, 64, 3), len(spec.labels), norm["mean"], norm["std"])
    train_lib.warm_start(model, str(model_dir / "checkpoints"))
    model.get_layer("backbone").save_weights(str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrain_epochs", type=int, default=8)
    parser.add_argument("--per_class", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = photo_set(root / "a", PRETRAIN_SOURCES, 60, seed=3)
        b = photo_set(root / "b", None, args.per_class, seed=4)
        pretrained, seconds = train(a, root / "pretrain", args.pretrain_epochs)
        print(f"pre-training on A: test accuracy {pretrained['test']['accuracy']:.3f} "
              f"({seconds:.0f} s)")
        weights = root / "a_backbone.weights.h5"
        save_backbone(a, root / "pretrain", weights)
        for name, flags in (("from scratch", ["--weights", "none"]),
                            ("fine-tuned", ["--weights", str(weights), "--freeze_epochs",
                                            "2"])):
            metrics, seconds = train(b, root / name.replace(" ", "_"), args.epochs, *flags)
            test = metrics["test"]
            print(f"{name:>12} on B, {args.epochs} epochs: test accuracy "
                  f"{test['accuracy']:.3f}, loss {test['loss']:.3f}, ECE "
                  f"{test['expected_calibration_error']:.3f} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()

"""Defaults before and after (issue 16): test accuracy and the train/validation gap, from scratch.

    .venv/bin/python -m tests.benchmarks.trainer_defaults [--epochs 12] [--per_class 40]
        [--seeds 0,1,2] [--model small_cnn] [--arms all]

A photo set harder than the demo's: 20 classes, the four quadrants of five scikit-image
photos (astronaut, chelsea, coffee, rocket, immunohistochemistry), so neighbouring classes
share colours and textures. Each image is a random crop of its quadrant (40-90 %, flip,
brightness, `tests.support.demo_data.random_crop`) at a random size (height 48-160 px,
4:3) with a random gain per colour channel (0.85-1.15), saved as JPEG; preprocessed to
64 px, splits 0.7/0.15/0.15. Then trained from scratch with the old defaults
(`--augment none --lr_schedule constant`) and with the new ones (no flags: light
augmentation, warmup + cosine), no early stopping in either, for each `--seed`; `--arms all`
adds each change alone (cosine only, light augmentation only). Prints
per run the test accuracy and the gap (train minus validation accuracy at the last epoch;
train accuracy is on the augmented batches where augmentation is on), then the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support import demo_data

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")
HEIGHTS = (48, 160)
GAIN = (0.85, 1.15)
ARMS = {"old defaults": ["--augment", "none", "--lr_schedule", "constant"],
        "new defaults": [],
        # The two changes one at a time (--arms all):
        "cosine only": ["--augment", "none"],
        "light only": ["--lr_schedule", "constant"]}
DEFAULT_ARMS = ("old defaults", "new defaults")


def make_images(out_dir: Path, per_class: int, seed: int = 0) -> None:
    """`out_dir/<photo>_<quadrant>/NNNN.jpg`: 20 classes, `per_class` each."""
    for photo_index, photo_name in enumerate(PHOTOS):
        photo = Image.fromarray(demo_data._load_photo(photo_name))
        half_w, half_h = photo.width // 2, photo.height // 2
        for quadrant_index, quadrant in enumerate(QUADRANTS):
            left, top = (quadrant_index % 2) * half_w, (quadrant_index // 2) * half_h
            part = photo.crop((left, top, left + half_w, top + half_h))
            rng = np.random.default_rng([seed, photo_index, quadrant_index])
            folder = out_dir / f"{photo_name}_{quadrant}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                height = int(rng.integers(*HEIGHTS))
                crop = demo_data.random_crop(part, (height, height * 4 // 3), rng)
                pixels = np.asarray(crop, np.float32) * rng.uniform(*GAIN, size=3)
                Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(
                    folder / f"{index:04d}.jpg", quality=demo_data.JPEG_QUALITY)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--per_class", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma list of {', '.join(ARMS)}, or all")
    args = parser.parse_args()
    arms = {name: ARMS[name] for name in (ARMS if args.arms == "all" else args.arms.split(","))}
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "raw", args.per_class)
        subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input",
                        str(root / "raw"), "--output", str(root / "prep"), "--image_size", "64",
                        "--num_shards", "2", "--no_progress", "--splits",
                        "train=0.7,validation=0.15,test=0.15"], check=True, capture_output=True)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
        for seed in seeds:
            for name, flags in arms.items():
                model_dir = root / f"{name.replace(' ', '_')}_{seed}"
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "trainer.task", "--data",
                                str(root / "prep"), "--model_dir", str(model_dir), "--model",
                                args.model, "--epochs", str(args.epochs), "--batch_size", "32",
                                "--progress", "off", "--seed", str(seed), *flags],
                               check=True, capture_output=True)
                metrics = json.loads((model_dir / "metrics.json").read_text())
                last = metrics["history"][-1]
                accuracy, gap = metrics["test"]["accuracy"], last["accuracy"] - last[
                    "val_accuracy"]
                results[name].append((accuracy, gap))
                print(f"seed {seed} {name}: test accuracy {accuracy:.3f} (n="
                      f"{sum(map(sum, metrics['test']['confusion_matrix']))}, 20 classes), "
                      f"train {last['accuracy']:.3f} - validation {last['val_accuracy']:.3f} "
                      f"= gap {gap:+.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        for name, rows in results.items():
            print(f"{name}: median test accuracy {statistics.median(r[0] for r in rows):.3f}, "
                  f"median gap {statistics.median(r[1] for r in rows):+.3f} over seeds {seeds}")


if __name__ == "__main__":
    main()

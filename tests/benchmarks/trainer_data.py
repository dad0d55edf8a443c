"""Preprocess outputs the trainer benchmarks read, made once and cached in /tmp.

Raw photos come from `preprocess_throughput.photo_corpus` (500x375 JPEG crops of
real photos, 4 classes); the output keeps every image in `train` so an epoch is
the whole corpus, the same files `image_dataset_from_directory` reads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.preprocess_throughput import CACHE, photo_corpus


def prepared(count: int, image_size: int = 224, image_format: str = "jpeg"
             ) -> tuple[Path, Path]:
    """(raw class folders, preprocess output) for ~`count` images at `image_size` px."""
    raw = photo_corpus(count)
    out = CACHE / f"prep-{count}-{image_size}" if image_format == "jpeg" else (
        CACHE / f"prep-{count}-{image_size}-{image_format}")
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input", str(raw),
                        "--output", str(out), "--image_size", str(image_size),
                        "--splits", "train=1", "--image_format", image_format,
                        "--no_progress"], check=True)
    return raw, out

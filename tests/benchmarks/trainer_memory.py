"""Peak memory of one training epoch at 1,000 / 4,000 / 16,000 images: flat, not data-sized.

    .venv/bin/python -m tests.benchmarks.trainer_memory [--sizes 1000,4000,16000]

Runs `python -m trainer.task --model linear --epochs 1` (224 px, batch 32, default
64 MB shuffle buffer) on preprocess outputs of N photo crops, and reports
- epoch peak: `ru_maxrss` at the end of the epoch, from metrics.json (before
  evaluation and export);
- process peak: the whole command's max RSS, `/usr/bin/time -v`.
Flat memory: the 4,000-image figures within 15% of the 1,000-image ones (and 16,000
within the same bound).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.trainer_data import prepared


def one_epoch(prep: Path) -> tuple[float, float, float]:
    """(epoch peak RSS MB, process peak RSS MB, input images/s) of one linear-probe epoch."""
    with tempfile.TemporaryDirectory(prefix="imagebeam-bench-model-") as model_dir:
        run = subprocess.run(
            ["/usr/bin/time", "-v", sys.executable, "-m", "trainer.task", "--data", str(prep),
             "--model_dir", model_dir, "--model", "linear", "--epochs", "1", "--batch_size",
             "32", "--progress", "off"], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-3000:])
        metrics = json.loads((Path(model_dir) / "metrics.json").read_text())
    process_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1])
    row = metrics["history"][-1]
    return row["peak_rss_mb"], process_kb / 1024, row["images_per_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,4000,16000")
    args = parser.parse_args(argv)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        _, prep = prepared(size)
        images = json.loads((prep / "manifest.json").read_text())["splits"]["train"][
            "num_examples"]
        rows.append((images, *one_epoch(prep)))
    print(f"{'images':>7s} {'epoch peak MB':>14s} {'process peak MB':>16s} {'images/s':>9s}")
    for images, epoch_mb, process_mb, rate in rows:
        print(f"{images:7d} {epoch_mb:14.0f} {process_mb:16.0f} {rate:9.0f}")
    first, base_epoch, base_process, _ = rows[0]
    for images, epoch_mb, process_mb, _ in rows[1:]:
        print(f"growth {first} -> {images} images: epoch peak "
              f"{100 * (epoch_mb / base_epoch - 1):+.1f}%, process peak "
              f"{100 * (process_mb / base_process - 1):+.1f}% (limit +15%)")


if __name__ == "__main__":
    main()

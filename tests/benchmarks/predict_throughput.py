"""Batch prediction images/s: the predict command on the DirectRunner vs a plain loop.

    .venv/bin/python -m tests.benchmarks.predict_throughput [--images 1000] [--size 64]
        [--model small_cnn] [--batch_size 64]

Both sides run the same exported SavedModel (trainer.serving.export of an untrained
`--model` at `--size` px; the weights do not change the cost) over the same ~500x375 JPEG
crops of real photos, calling `serving_default` on batches of raw file bytes. The loop is
the floor: one process, files read in order, no listing, no accounting, no output. The
command runs as a subprocess; its own "done in" time (pipeline build to summary.json)
and its whole wall time (Python, TensorFlow and Beam start-up included) are both shown.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.support.demo_data import make_demo_images


def export_model(path: Path, name: str, size: int) -> None:
    from trainer import serving
    from trainer.model import make_model

    model = make_model(name, (size, size, 3), 4, np.full(3, 127.0, np.float32),
                       np.full(3, 64.0, np.float32))
    serving.export(model, str(path), ("astronaut", "cat", "coffee", "rocket"), size, size)


def plain_loop(saved_model: Path, files: list[Path], batch_size: int) -> float:
    """Seconds to read and predict every file, model loaded before the clock starts."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    serve(image_bytes=tf.constant([files[0].read_bytes()]))  # trace and warm up once
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        blobs = [path.read_bytes() for path in files[start:start + batch_size]]
        serve(image_bytes=tf.constant(blobs))["class_id"].numpy()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagebeam-predict-bench-"))
    make_demo_images(str(work / "raw"), per_class=args.images // 4, seed=0)
    files = sorted(p for p in (work / "raw").rglob("*.jpg"))
    export_model(work / "saved_model", args.model, args.size)

    command = [sys.executable, "-m", "pipelines.predict", "--model", str(work / "saved_model"),
               "--input", str(work / "raw"), "--output", str(work / "out"),
               "--batch_size", str(args.batch_size)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - started
    pipeline_s = float(re.search(r"done in ([0-9.]+)s", done.stderr).group(1))
    loop_s = plain_loop(work / "saved_model", files, args.batch_size)

    n = len(files)
    print(f"{n} JPEGs ~500x375 -> {args.model} at {args.size} px, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    print(f"plain loop (one process, model loaded)  {loop_s:7.1f} s  {n / loop_s:7.1f} images/s")
    print(f"predict command, pipeline ('done in')   {pipeline_s:7.1f} s  "
          f"{n / pipeline_s:7.1f} images/s")
    print(f"predict command, whole process           {wall:7.1f} s  {n / wall:7.1f} images/s")
    print(f"ratio pipeline / loop: {loop_s / pipeline_s:.2f}; "
          f"whole command / loop: {loop_s / wall:.2f}")


if __name__ == "__main__":
    main()

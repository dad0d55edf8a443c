"""Training throughput on one machine: one process vs two MultiWorkerMirroredStrategy
workers on loopback ports vs MirroredStrategy over two logical CPU devices.

    .venv/bin/python -m tests.benchmarks.distributed_training [--images 2000] [--epochs 3]

Same data (photo crops at 64 px, 4 train shards), model (small_cnn), global batch and
epochs for all three. Reports the chief's steady images/s (metrics.json: epochs after
the first), the whole command's wall time and the peak RSS of each process. On a CPU
the replicas share the same cores, so this measures what the distributed loop costs,
not what a second machine or GPU would add.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.preprocess_throughput import CACHE, photo_corpus


def prepared(images: int) -> Path:
    out = CACHE / f"prep-{images}-64-4shards"
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input",
                        str(photo_corpus(images)), "--output", str(out), "--image_size", "64",
                        "--splits", "train=0.9,validation=0.1", "--num_shards", "4",
                        "--no_progress"], check=True)
    return out


def _command(data: Path, model_dir: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return ["/usr/bin/time", "-v", sys.executable, "-m", "trainer.task", "--data", str(data),
            "--model_dir", model_dir, "--model", "small_cnn", "--epochs", str(args.epochs),
            "--batch_size", str(args.batch_size), "--progress", "off", *extra]


def _peak_mb(stderr: str) -> float:
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)[1]) / 1024


def run(name: str, commands: list[tuple[list[str], dict]], model_dir: str) -> dict:
    started = time.monotonic()
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
                 for command, env in commands]
    outputs = [p.communicate()[1] for p in processes]
    wall = time.monotonic() - started
    if any(p.returncode for p in processes):
        raise RuntimeError(f"{name} failed:\n" + "\n".join(o[-2000:] for o in outputs))
    metrics = json.loads((Path(model_dir) / "metrics.json").read_text())
    return {"name": name, "images_per_s": metrics["input_images_per_s"], "wall_s": wall,
            "peak_mb": [round(_peak_mb(o)) for o in outputs],
            "val_accuracy": metrics["validation"]["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    data = prepared(args.images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="imagebeam-bench-dist-") as scratch:
        single = f"{scratch}/single"
        rows.append(run("1 process, default strategy",
                        [(_command(data, single, args), dict(os.environ))], single))
        mirrored = f"{scratch}/mirrored"
        rows.append(run("1 process, MirroredStrategy over 2 logical CPUs",
                        [(_command(data, mirrored, args, "--cpu_replicas", "2"),
                          dict(os.environ))], mirrored))
        workers = f"{scratch}/workers"
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        rows.append(run("2 processes, MultiWorkerMirroredStrategy", [
            (_command(data, workers, args), {**os.environ, "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}})})
            for index in range(2)], workers))
    base = rows[0]["images_per_s"]
    print(f"{args.images} photo crops at 64 px, small_cnn, global batch {args.batch_size}, "
          f"{args.epochs} epochs, {os.cpu_count()} cores")
    print(f"{'run':<50} {'images/s':>9} {'ratio':>6} {'wall s':>7} {'peak MB':>12} {'val acc':>8}")
    for row in rows:
        print(f"{row['name']:<50} {row['images_per_s']:>9.1f} "
              f"{row['images_per_s'] / base:>6.2f} {row['wall_s']:>7.1f} "
              f"{'+'.join(map(str, row['peak_mb'])):>12} {row['val_accuracy']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a local preprocessing run spends its CPU, process by process.

    .venv/bin/python -m tests.benchmarks.preprocess_cpu [--sizes 2000,8000]

Runs `pipelines.preprocess` over the photo corpus of `preprocess_throughput` at two sizes,
sampling the CPU time of every process of the tree: the runner's own process (Beam's
steps, reading, hashing, writing shards and statistics), the decode worker processes
(decode, resize, encode) and the analysis process (tf.Transform). The difference between
the sizes is what each further image costs in each; the rest is fixed. Compare the total
per further image with the plain PIL loop's CPU per image (`preprocess_throughput`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.benchmarks.measure import Measured, run_measured
from tests.benchmarks.preprocess_throughput import photo_corpus

KINDS = ("runner process", "decode workers", "analysis process")


def cpu_by_kind(measured: Measured) -> Counter:
    """CPU seconds per kind of process: the root is the runner, decode workers run
    `serve_stdio`, and the analysis process is a fork of the root (same command line)."""
    totals = Counter()
    for pid, (command, seconds) in measured.cpu_s_by_process.items():
        if pid == measured.pid:
            totals["runner process"] += seconds
        elif "serve_stdio" in command:
            totals["decode workers"] += seconds
        else:
            totals["analysis process"] += seconds
    return totals


def measure(root: Path) -> tuple[Measured, Counter]:
    out = Path(tempfile.mkdtemp(prefix="imagebeam-bench-cpu-"))
    try:
        measured = run_measured([sys.executable, "-m", "pipelines.preprocess", "--input",
                                 str(root), "--output", str(out / "o"), "--no_progress"],
                                track_cpu=True)
        if measured.returncode != 0:
            raise RuntimeError(measured.output[-3000:])
        return measured, cpu_by_kind(measured)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="2000,8000", help="two corpus sizes")
    args = parser.parse_args(argv)
    small, large = (int(size) for size in args.sizes.split(","))
    (small_run, small_cpu), (large_run, large_cpu) = (measure(photo_corpus(small)),
                                                      measure(photo_corpus(large)))
    print(f"{'CPU seconds':20s} {small:>9d} {large:>9d} {'ms per further image':>21s}")
    for kind in (*KINDS, "all"):
        at_small = sum(small_cpu.values()) if kind == "all" else small_cpu[kind]
        at_large = sum(large_cpu.values()) if kind == "all" else large_cpu[kind]
        print(f"{kind:20s} {at_small:9.1f} {at_large:9.1f} "
              f"{(at_large - at_small) * 1000 / (large - small):21.2f}")
    print(f"{'wall seconds':20s} {small_run.wall_s:9.1f} {large_run.wall_s:9.1f} "
          f"{(large_run.wall_s - small_run.wall_s) * 1000 / (large - small):21.2f}")


if __name__ == "__main__":
    main()

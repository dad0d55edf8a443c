"""`make bench`: every benchmark in turn, each printing its own table.

Each compares the project with the obvious alternative in the same run (ratios hold
on a shared, noisy machine; absolute numbers drift). Generated data is cached under
/tmp/imagebeam-bench. Not part of `make test`.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    ("Preprocessing vs a multiprocessing PIL loop and naive Beam; peak RSS at 1k / 4k / 16k",
     "tests.benchmarks.preprocess_throughput", []),
    ("Preprocessing CPU by process (runner, decode workers, analysis), per further image",
     "tests.benchmarks.preprocess_cpu", []),
    ("JPEG decode CPU per image: PIL vs simplejpeg, sources and stored shards",
     "tests.benchmarks.jpeg_decoders", []),
    ("Statistics phase share of the preprocessing run",
     "tests.benchmarks.stats_overhead", ["--repeats", "1"]),
    ("Input pipeline vs image_dataset_from_directory (linear probe, 224 px)",
     "tests.benchmarks.trainer_vs_keras", []),
    ("Training epoch peak RSS at 1k / 4k / 16k images", "tests.benchmarks.trainer_memory", []),
    ("Sampling uniformity over 1:2:3 shards: naive interleave vs ours",
     "tests.benchmarks.sampling_uniformity", []),
)


def main() -> int:
    failed = 0
    for title, module, args in BENCHMARKS:
        print(f"\n== {title}\n   python -m {module} {' '.join(args)}", flush=True)
        completed = subprocess.run([sys.executable, "-m", module, *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        print(completed.stdout, flush=True)
        failed += completed.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

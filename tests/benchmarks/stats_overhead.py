"""What the statistics phase costs: the same corpus preprocessed with and without it.

    .venv/bin/python -m tests.benchmarks.stats_overhead [--images 2000] [--repeats 2]

The statistics phase = per-split statistics proto, tf.Transform analysis of the train
split, drift, the HTML report (thumbnails read back from the shards). Steps of one
Beam pipeline overlap, so timing them inside a run would not say what they add; this
runs the whole pipeline twice on the same corpus, once as `python -m
pipelines.preprocess` builds it and once with `build_pipeline(statistics=False)`,
alternating, each in a fresh process, and compares median wall times:

    share = (with - without) / with

`pipeline` is build + run + wait in the child (what the statistics can change);
`command` adds process start and imports; `cpu` is user+sys seconds of the whole
process tree (Beam's workers are reaped, so they count), which a busy shared machine
disturbs far less than wall time: compare both. Corpus: ~500x375 JPEG crops of real photos
in 4 classes, resized to 224x224 JPEG, cached under /tmp.

Without the statistics phase the job never loads TensorFlow (~3 s of CPU and ~570 MB):
only tf.Transform needs it, so its import is part of what the phase costs. With it, a
local run does tf.Transform's analysis in a second process started before the listing
(`pipelines.local.analysis_process`), as `preprocess.run` does; `cpu` and peak RSS count it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.measure import run_measured


def corpus(count: int) -> Path:
    """~`count` 500x375 JPEG crops of real photos in 4 classes (the throughput
    benchmark's corpus, cached between runs)."""
    from tests.benchmarks.preprocess_throughput import photo_corpus

    return photo_corpus(count)


def child(mode: str, input_dir: str, output: str) -> None:
    """One timed pipeline run in this process, as `preprocess.run` makes it (the
    analysis process started first, when the statistics phase runs); prints
    {"pipeline_s": ...} as JSON."""
    from pipelines.contract import manifest as manifest_lib
    from pipelines.local import analysis_process
    from pipelines.preprocessing import output as output_lib
    from pipelines.preprocessing import pipeline as preprocess
    from pipelines.preprocessing.options import parse_args

    config, options = parse_args(["--input", input_dir, "--output", output, "--no_progress"])
    analysis_context = (analysis_process.started(options) if mode == "with"
                        else contextlib.nullcontext())
    with analysis_context as analysis:
        listing = preprocess.list_input(config)
        output_lib.prepare_output(config)
        started = time.monotonic()
        pipeline = preprocess.build_pipeline(config, options, listing,
                                             statistics=(mode == "with"), analysis=analysis)
        gc.freeze()  # as preprocess.run does once the pipeline is built
        pipeline.run().wait_until_finish()
        elapsed = time.monotonic() - started
    manifest = manifest_lib.read_manifest(output)
    print(json.dumps({"pipeline_s": elapsed, "images": manifest.accounting.images_written,
                      "has_statistics": manifest.statistics is not None}), flush=True)


def measure(mode: str, root: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="imagebeam-stats-bench-"))
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        measured = run_measured([sys.executable, "-m", "tests.benchmarks.stats_overhead",
                                 "--child", mode, "--input", str(root),
                                 "--output", str(out / "o")])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if measured.returncode != 0:
            raise RuntimeError(measured.output[-3000:])
        line = [x for x in measured.output.splitlines() if x.startswith('{"pipeline_s"')][-1]
        result = json.loads(line)
        if result["has_statistics"] != (mode == "with"):
            raise RuntimeError(f"{mode} run: statistics in manifest = {result['has_statistics']}")
        return {**result, "command_s": measured.wall_s, "cpu_s": cpu_s,
                "peak_rss_mb": measured.peak_tree_rss_mb}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.input, args.output)
        return
    root = corpus(args.images)
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for repeat in range(args.repeats):
        # Alternate the order so a warming page cache or a noisy neighbour hits both.
        for mode in (("without", "with") if repeat % 2 == 0 else ("with", "without")):
            runs[mode].append(measure(mode, root))
            last = runs[mode][-1]
            print(f"  {mode:8s} run {repeat + 1}: pipeline {last['pipeline_s']:.1f}s, "
                  f"command {last['command_s']:.1f}s, cpu {last['cpu_s']:.1f}s",
                  file=sys.stderr, flush=True)
    median = {mode: {key: statistics.median(r[key] for r in results)
                     for key in ("pipeline_s", "command_s", "cpu_s", "peak_rss_mb")}
              for mode, results in runs.items()}
    images = runs["with"][0]["images"]
    print(f"images: {images} (500x375 photo JPEGs -> 224x224 JPEG), repeats: {args.repeats}, "
          "medians")
    print(f"{'':34s} {'pipeline s':>10s} {'command s':>10s} {'cpu s':>8s} {'peak RSS MB':>12s}")
    for mode, label in (("without", "without statistics phase"),
                        ("with", "with statistics phase (default)")):
        m = median[mode]
        print(f"{label:34s} {m['pipeline_s']:10.1f} {m['command_s']:10.1f} {m['cpu_s']:8.1f} "
              f"{m['peak_rss_mb']:12.0f}")
    for key, label in (("pipeline_s", "pipeline wall"), ("command_s", "command wall"),
                       ("cpu_s", "CPU")):
        with_s, without_s = median["with"][key], median["without"][key]
        print(f"statistics share of {label} time: {(with_s - without_s) / with_s:.1%} "
              f"(+{with_s - without_s:.1f}s)")


if __name__ == "__main__":
    main()

"""Preprocessing images/s and peak memory vs a plain multiprocessing PIL loop.

    .venv/bin/python -m tests.benchmarks.preprocess_throughput [--images N] [--sizes 1000,4000]

Both sides decode ~500x375 photo JPEGs (crops of real photos), resize to 224 px and
encode JPEG with their defaults on this machine. The PIL loop is the decode limit: no dedup,
no splits, no shards, no accounting. The naive Beam job (tests/benchmarks/naive_beam.py:
Create -> Map(eager TensorFlow per image) -> WriteToTFRecord, on our runner defaults) is
what users typically write first; both Beam sides run as measured subprocesses, so wall
time and peak RSS of the whole process tree compare. Prints a table; the ratios are what
to compare across machines (absolute numbers drift on a shared box).
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import simplejpeg
from PIL import Image

from pipelines.contract import imaging
from tests.benchmarks.measure import run_measured
from tests.support.demo_data import make_demo_images  # noqa: I001

PER_CLASS_DIVISOR = 4  # make_demo_images writes 4 classes
CACHE = Path(tempfile.gettempdir()) / "imagebeam-bench"


def photo_corpus(count: int) -> Path:
    """~`count` 500x375 JPEG crops of real photos, cached between runs."""
    root = CACHE / f"raw-{count}"
    if not root.exists():
        staging = root.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        make_demo_images(str(staging), per_class=count // PER_CLASS_DIVISOR, size=(375, 500))
        staging.rename(root)
    return root


def pil_decode_resize_encode(path: str) -> int:
    """The decode limit: what any pipeline must do per image, and nothing else."""
    with Image.open(path) as image:
        image.draft("RGB", (224, 224))
        resized = image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=90, subsampling=2)  # our default
    return len(buffer.getvalue())


def turbo_decode_resize_encode(path: str) -> int:
    """The same loop with libjpeg-turbo's DCT-scaled decode through simplejpeg (the
    decoder the pipeline uses for JPEG): what the plain loop could reach."""
    with open(path, "rb") as handle:
        data = handle.read()
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    scale = imaging.draft_scale((width, height), (224, 224))
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                    min_width=-(-width // scale))
    resized = Image.fromarray(pixels).resize((224, 224), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=90, subsampling=2)
    return len(buffer.getvalue())


def pool_rate(root: Path, work=pil_decode_resize_encode,
              repeats: int = 3) -> tuple[float, int, float]:
    """(best images/s of `repeats` runs, files, CPU seconds an image): the loop takes 2-3 s
    and swings with the shared machine's load; its best is the limit to compare with."""
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    best = 0.0
    cpu = children_cpu_s()
    with Pool(os.cpu_count()) as pool:
        for _ in range(repeats):
            started = time.monotonic()
            pool.map(work, files, chunksize=16)
            best = max(best, len(files) / (time.monotonic() - started))
    return best, len(files), (children_cpu_s() - cpu) / (repeats * len(files))


def children_cpu_s() -> float:
    """User + system CPU seconds of every finished child process so far: unlike wall
    time, CPU per image hardly moves with the load other processes put on the machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline_run(root: Path) -> tuple[float, float, int, float]:
    """(images/s over the whole command, peak RSS of the process tree MB, images, CPU
    seconds of the process tree)."""
    out = Path(tempfile.mkdtemp(prefix="imagebeam-bench-out-"))
    cpu = children_cpu_s()
    try:
        measured = run_measured([sys.executable, "-m", "pipelines.preprocess", "--input",
                                 str(root), "--output", str(out / "o"), "--no_progress"])
        if measured.returncode != 0:
            raise RuntimeError(measured.output[-3000:])
        images = sum(1 for _ in root.rglob("*.jpg"))
        return (images / measured.wall_s, measured.peak_tree_rss_mb, images,
                children_cpu_s() - cpu)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def count_tfrecords(files: list[Path]) -> int:
    """Records in uncompressed TFRecord files, read from the framing (no TensorFlow here:
    this process must stay light, and the count must not depend on the code it checks)."""
    count = 0
    for path in files:
        with open(path, "rb") as handle:
            while header := handle.read(12):  # uint64 length, uint32 length CRC
                (length,) = struct.unpack("<Q", header[:8])
                handle.seek(length + 4, io.SEEK_CUR)  # payload, payload CRC
                count += 1
    return count


def naive_beam_run(root: Path) -> tuple[float, float, int]:
    """(images/s, peak tree RSS MB, records written) of the naive Beam job."""
    out = Path(tempfile.mkdtemp(prefix="imagebeam-bench-naive-"))
    try:
        measured = run_measured([sys.executable, "-m", "tests.benchmarks.naive_beam",
                                 "--input", str(root), "--output", str(out)])
        if measured.returncode != 0:
            raise RuntimeError(measured.output[-3000:])
        records = count_tfrecords(sorted(out.glob("*.tfrecord")))
        images = sum(1 for _ in root.rglob("*.jpg"))
        # A baseline that silently wrote nothing would look fast.
        if records != images:
            raise RuntimeError(f"naive Beam wrote {records} records for {images} images")
        return images / measured.wall_s, measured.peak_tree_rss_mb, records
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", default="1000,4000,16000",
                        help="dataset sizes for peak memory ('' for none)")
    parser.add_argument("--no_naive", action="store_true", help="skip the naive Beam job")
    args = parser.parse_args(argv)
    root = photo_corpus(args.images)
    load = os.getloadavg()[0]
    limit, count, limit_cpu = pool_rate(root)
    turbo, _, turbo_cpu = pool_rate(root, turbo_decode_resize_encode)
    rate, peak, _, cpu = pipeline_run(root)
    print(f"cores: {os.cpu_count()}, images: {count} (500x375 JPEG -> 224x224 JPEG), "
          f"load average at start {load:.1f}")
    print("ratio: images/s over the PIL loop's; CPU ratio: the loop's CPU per image over "
          "this row's (load hardly moves it)")
    print(f"{'what':44s} {'images/s':>9s} {'ratio':>6s} {'CPU ms/img':>11s} {'CPU ratio':>10s} "
          f"{'peak RSS MB':>12s}")

    def row(what: str, images_s: float, cpu_s: float, peak_mb: float | None = None) -> None:
        print(f"{what:44s} {images_s:9.0f} {images_s / limit:6.2f} {cpu_s * 1000:11.2f} "
              f"{limit_cpu / cpu_s:10.2f} {'' if peak_mb is None else f'{peak_mb:.0f}':>12s}")

    row("multiprocessing PIL loop (decode limit)", limit, limit_cpu)
    row("the same loop, simplejpeg DCT-scaled decode", turbo, turbo_cpu)
    row("pipelines.preprocess (whole command)", rate, cpu / count, peak)
    if not args.no_naive:
        naive_rate, naive_peak, records = naive_beam_run(root)
        print(f"{f'naive Beam + eager TF ({records} records)':44s} {naive_rate:9.0f} "
              f"{naive_rate / limit:6.2f} {'':>11s} {'':>10s} {naive_peak:12.0f}")
        print(f"ours / naive Beam: {rate / naive_rate:.2f}x images/s, "
              f"{peak / naive_peak:.2f}x peak RSS")
    runs = []
    for size in (int(s) for s in args.sizes.split(",") if s):  # --sizes '' skips them
        rate, peak, images, cpu = pipeline_run(photo_corpus(size))
        runs.append((images, images / rate, cpu))
        row(f"pipelines.preprocess, {images} images", rate, cpu / images, peak)
    # The whole command carries a fixed cost (imports, pipeline construction, the
    # tf.Transform analysis); the rate between two sizes is what each further image costs.
    for (small, small_s, small_cpu), (large, large_s, large_cpu) in itertools.pairwise(runs):
        row(f"  per further image, {small} -> {large}", (large - small) / (large_s - small_s),
            (large_cpu - small_cpu) / (large - small))
    print(f"load average at end {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()

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
import shutil
import struct
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

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


def pil_pool_rate(root: Path, repeats: int = 3) -> tuple[float, int]:
    """(best images/s of `repeats` runs, files): the loop takes 2-3 s, and one run on this
    shared machine ranged from 640 to 1,000 img/s; its best is the limit to compare with."""
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    best = 0.0
    with Pool(os.cpu_count()) as pool:
        for _ in range(repeats):
            started = time.monotonic()
            pool.map(pil_decode_resize_encode, files, chunksize=16)
            best = max(best, len(files) / (time.monotonic() - started))
    return best, len(files)


def pipeline_run(root: Path) -> tuple[float, float, int]:
    """(images/s over the whole command, peak RSS of the process tree MB, images)."""
    out = Path(tempfile.mkdtemp(prefix="imagebeam-bench-out-"))
    try:
        measured = run_measured([sys.executable, "-m", "pipelines.preprocess", "--input",
                                 str(root), "--output", str(out / "o"), "--no_progress"])
        if measured.returncode != 0:
            raise RuntimeError(measured.output[-3000:])
        images = sum(1 for _ in root.rglob("*.jpg"))
        return images / measured.wall_s, measured.peak_tree_rss_mb, images
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
    args = parser.parse_args(argv)
    root = photo_corpus(args.images)
    limit, count = pil_pool_rate(root)
    rate, peak, _ = pipeline_run(root)
    naive_rate, naive_peak, records = naive_beam_run(root)
    print(f"cores: {os.cpu_count()}, images: {count} (500x375 JPEG -> 224x224 JPEG)")
    print(f"{'what':44s} {'images/s':>9s} {'ratio':>6s} {'peak RSS MB':>12s}")
    print(f"{'multiprocessing PIL loop (decode limit)':44s} {limit:9.0f} {1:6.2f} {'':>12s}")
    print(f"{'pipelines.preprocess (whole command)':44s} {rate:9.0f} {rate / limit:6.2f} "
          f"{peak:12.0f}")
    print(f"{f'naive Beam + eager TF ({records} records)':44s} {naive_rate:9.0f} "
          f"{naive_rate / limit:6.2f} {naive_peak:12.0f}")
    print(f"ours / naive Beam: {rate / naive_rate:.2f}x images/s, "
          f"{peak / naive_peak:.2f}x peak RSS")
    runs = []
    for size in (int(s) for s in args.sizes.split(",") if s):  # --sizes '' skips them
        rate, peak, images = pipeline_run(photo_corpus(size))
        runs.append((images, images / rate))
        print(f"{f'pipelines.preprocess, {images} images':44s} {rate:9.0f} {'':>6s} {peak:12.0f}")
    # The whole command carries a fixed cost (imports, pipeline construction, the
    # tf.Transform analysis); the rate between two sizes is what each further image costs.
    for (small, small_s), (large, large_s) in itertools.pairwise(runs):
        marginal = (large - small) / (large_s - small_s)
        print(f"{f'  per further image, {small} -> {large}':44s} {marginal:9.0f} "
              f"{marginal / limit:6.2f} {'':>12s}")


if __name__ == "__main__":
    main()

"""JPEG decode CPU per image on one core: PIL against simplejpeg, sources and stored shards.

    .venv/bin/python -m tests.benchmarks.jpeg_decoders [--images 300]

Rows: the ~500x375 photo sources (PIL's open + draft + load to a PIL image, simplejpeg at the
same DCT scale to an array, and `imaging.decode_image`, which adds the header checks, EXIF and
the PIL image), then the 224 px JPEGs the shards store, to arrays (what the trainer's input
and the TensorFlow-free reader decode).
CPU time of this process, best of 3 passes: the load other jobs put on a shared machine
moves wall time far more than CPU time. The ratio is against PIL on the same files.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import simplejpeg
from PIL import Image

from pipelines.contract import imaging
from tests.benchmarks.preprocess_throughput import photo_corpus

TARGET = (224, 224)


def cpu_per_item(work: Callable[[bytes], object], items: Sequence[bytes], passes: int = 3) -> float:
    """Least CPU seconds per item over `passes` passes."""
    best = float("inf")
    for _ in range(passes):
        started = time.process_time()
        for item in items:
            work(item)
        best = min(best, (time.process_time() - started) / len(items))
    return best


def pil_draft(data: bytes) -> Image.Image:
    """What decode_image did before simplejpeg, less the checks: a PIL image, no array
    (the pipeline resizes in PIL; converting to numpy would cost PIL more than it pays)."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", TARGET)
    return image.convert("RGB")


def turbo_draft(data: bytes) -> np.ndarray:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    scale = imaging.draft_scale((width, height), TARGET)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                  min_width=-(-width // scale))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args(argv)
    files = sorted(photo_corpus(2000).rglob("*.jpg"))[: args.images]
    sources = [path.read_bytes() for path in files]
    stored = [imaging.process_image(data, imaging.ImageSpec(*TARGET)).encoded for data in sources]
    load = os.getloadavg()[0]
    rows = [
        ("source, PIL draft decode", pil_draft, sources),
        ("source, simplejpeg at the same scale", turbo_draft, sources),
        ("source, imaging.decode_image", lambda d: imaging.decode_image(d, TARGET), sources),
        ("stored 224 px, PIL", lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")),
         stored),
        ("stored 224 px, simplejpeg", lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"),
         stored),
    ]
    print(f"{len(sources)} images, one core, load average at start {load:.1f}")
    print(f"{'what':40s} {'CPU ms/img':>10s} {'img/s/core':>10s} {'vs PIL':>7s}")
    baseline = {}
    for what, work, items in rows:
        cost = cpu_per_item(work, items)
        kind = what.split(",")[0]
        baseline.setdefault(kind, cost)
        print(f"{what:40s} {cost * 1000:10.3f} {1 / cost:10.0f} {baseline[kind] / cost:7.2f}")
    print_parts(sources)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


def print_parts(sources: Sequence[bytes]) -> None:
    """Where `imaging.process_image`'s CPU goes per image, beside the plain loop's three
    steps (PIL's draft decode, the same resize, PIL's encode): what a pipeline that
    must store exactly these pixels can save by decoding faster."""
    spec = imaging.ImageSpec(*TARGET)
    decoded = [imaging.decode_image(d, TARGET)[0] for d in sources]
    resized = [imaging.resize_image(i, TARGET, spec.resize) for i in decoded]
    parts = [
        ("decode_image (simplejpeg, checks, EXIF)", lambda d: imaging.decode_image(d, TARGET),
         sources),
        ("resize (PIL bilinear, antialiased)",
         lambda i: imaging.resize_image(i, TARGET, spec.resize), decoded),
        ("channel_moments", imaging.channel_moments, resized),
        ("perceptual_hash", imaging.perceptual_hash, resized),
        ("encode JPEG q90", lambda i: imaging.encode_image(i, spec.image_format,
                                                           spec.jpeg_quality), resized),
    ]
    costs = {what: cpu_per_item(work, items) for what, work, items in parts}
    whole = cpu_per_item(lambda d: imaging.process_image(d, spec), sources)
    loop = (cpu_per_item(pil_draft, sources) + costs[parts[1][0]] + costs[parts[4][0]])
    print(f"\n{'process_image, per part':40s} {'CPU ms/img':>10s}")
    for what, cost in costs.items():
        print(f"{what:40s} {cost * 1000:10.3f}")
    print(f"{'process_image (all of it)':40s} {whole * 1000:10.3f}")
    print(f"{'plain loop: PIL draft + resize + encode':40s} {loop * 1000:10.3f}")


if __name__ == "__main__":
    main()

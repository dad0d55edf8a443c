"""The naive Beam baseline: the preprocessing job users typically write first.

    .venv/bin/python -m tests.benchmarks.naive_beam --input DIR --output DIR [beam flags]

`beam.Create(file paths)` -> `beam.Map` that runs TensorFlow eagerly on one image at a
time (read, decode, resize to 224x224, cast to uint8, encode JPEG q95) and builds a
`tf.train.Example` (encoded image + parent folder name as label) -> `WriteToTFRecord`.
No dedup, splits, statistics or manifest: less work than `pipelines.preprocess`, so it
is a lower bound on what a straightforward Beam job costs, and the gap to it is what
our design (PIL in C without the GIL, no TensorFlow in workers) buys. It runs on our
runner defaults (`pipelines.preprocessing.options.beam_options`: the DirectRunner, `in_memory`)
so the two sides differ only in the pipeline; other Beam flags pass through.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import sys
from collections.abc import Sequence

import apache_beam as beam
import tensorflow as tf

from pipelines.preprocessing.options import beam_options

SIZE = 224
JPEG_QUALITY = 95
OUTPUT_PREFIX = "naive"
OUTPUT_SUFFIX = ".tfrecord"


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def to_example(path: str) -> bytes:
    """One image file -> a serialized Example, each step an eager TensorFlow op."""
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    resized = tf.image.resize(image, [SIZE, SIZE])  # bilinear, float32
    encoded = tf.io.encode_jpeg(tf.cast(resized, tf.uint8), quality=JPEG_QUALITY)
    label = os.path.basename(os.path.dirname(path))
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": _bytes_feature(encoded.numpy()),
        "image/class/text": _bytes_feature(label.encode()),
    }))
    return example.SerializeToString()


def list_images(root: str) -> list[str]:
    """`root/<label>/<file>`, listed up front in the driver as a first script would."""
    return sorted(tf.io.gfile.glob(os.path.join(root, "*", "*.jpg")))


def build(pipeline: beam.Pipeline, paths: Sequence[str], output: str) -> None:
    """Adds Create -> Map(to_example) -> WriteToTFRecord to `pipeline`."""
    _ = (
        pipeline
        | "Paths" >> beam.Create(list(paths))
        | "ToExample" >> beam.Map(to_example)
        | "Write" >> beam.io.WriteToTFRecord(os.path.join(output, OUTPUT_PREFIX),
                                             file_name_suffix=OUTPUT_SUFFIX)
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; flags other than ours go to Beam. Returns images listed."""
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.naive_beam")
    parser.add_argument("--input", required=True, help="folder laid out as <label>/<file>.jpg")
    parser.add_argument("--output", required=True, help="folder for the TFRecord files")
    known, beam_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    paths = list_images(known.input)
    if not paths:
        raise SystemExit(f"no *.jpg under {known.input}/<label>/")
    with beam.Pipeline(options=beam_options(beam_args)) as pipeline:
        build(pipeline, paths, known.output)
    return len(paths)


if __name__ == "__main__":
    print(f"images: {run()}")

"""tf.Transform golden tests: mean/std equal numpy's on the same pixels, vocabulary right."""

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.contract import records, transform_output
from pipelines.contract.imaging import ImageFormat, ImageSpec, process_image
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing.spill import SpillRef
from pipelines.preprocessing.transforms import ImageMeta, UniqueImage
from pipelines.stats import analyzers
from tests import corpus, stats_outputs

SPEC = ImageSpec(12, 16, image_format=ImageFormat.RAW)


def unique_image(data: bytes, labels: tuple[str, ...], split: str, name: str):
    """(UniqueImage as the pipeline makes it, its stored pixels HxWx3 uint8)."""
    processed = process_image(data, SPEC)
    pixels = np.frombuffer(processed.encoded, np.uint8).reshape(SPEC.height, SPEC.width, 3)
    image = UniqueImage(
        sha256=name, uris=(name,), labels=labels, label_conflict=False,
        spill=SpillRef("unused", 0, len(processed.encoded)), source_bytes=len(data),
        meta=ImageMeta.of(processed), split=split, order=name)
    return image, pixels


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    encodings = corpus.every_encoding()
    train = [
        unique_image(encodings["baseline.jpg"], ("cat",), "train", "a"),
        unique_image(encodings["rgba.png"], ("cat", "sea lion"), "train", "b"),
        unique_image(encodings["gray.jpg"], ("dog",), "train", "c"),
        unique_image(corpus.encode(corpus.two_halves(), "PNG"), ("cat",), "train", "d"),
    ]
    # Other splits must not reach the analyzers: a white image with its own label.
    white = corpus.encode(corpus.two_halves(left=corpus.WHITE, right=corpus.WHITE), "PNG")
    held_out = [unique_image(white, ("zebra",), "validation", "e")]
    out = tmp_path_factory.mktemp("tft")
    with TestPipeline() as p:
        images = p | beam.Create([image for image, _ in train + held_out])
        written = images | "Train" >> analyzers.AnalyzeTrainSplit(
            str(out), "train", SPEC.height * SPEC.width)
        assert_that(written, equal_to([analyzers.TRANSFORM_OUTPUT]))
        # No image is in split "fit": tf.Transform over an empty train split.
        _ = images | "Empty" >> analyzers.AnalyzeTrainSplit(
            str(out / "empty"), "fit", SPEC.height * SPEC.width)
    pixels = np.stack([p for _, p in train]).reshape(-1, 3).astype(np.float64)
    return out / analyzers.TRANSFORM_OUTPUT, pixels


def test_mean_and_std_equal_numpy_on_the_train_pixels(golden):
    path, pixels = golden
    numbers = transform_output.normalization_from_transform_output(str(path))
    assert numbers["mean"].dtype == np.float32 and numbers["mean"].shape == (3,)
    np.testing.assert_allclose(numbers["mean"], pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(numbers["std"], pixels.std(axis=0), rtol=1e-4)


def test_vocabulary_counts_each_label_once_per_train_image(golden):
    path, _ = golden
    numbers = transform_output.normalization_from_transform_output(str(path))
    assert numbers["label_frequencies"] == {"cat": 3, "sea lion": 1, "dog": 1}
    assert numbers["labels"] == ["cat", "dog", "sea lion"]
    output = tft.TFTransformOutput(str(path))  # what the trainer loads
    assert output.vocabulary_file_by_name(analyzers.LABEL_VOCABULARY)
    assert set(output.transformed_feature_spec()) == {analyzers.PIXEL_MEAN, analyzers.PIXEL_STD}


def test_empty_train_split_gives_zeros_and_no_labels(golden):
    path, _ = golden
    numbers = transform_output.normalization_from_transform_output(str(path.parent / "empty" /
                                                                analyzers.TRANSFORM_OUTPUT))
    assert numbers["labels"] == [] and numbers["label_frequencies"] == {}
    assert numbers["mean"].tolist() == [0, 0, 0] and numbers["std"].tolist() == [0, 0, 0]


def test_frequency_vocabulary_lines_parse():
    lines = [b"12 cat\n", b"3 sea__SPACE__lion\n", b"\n"]
    assert transform_output.parse_frequency_vocabulary(lines) == {"cat": 12, "sea lion": 3}


def test_train_split_is_train_else_the_first():
    assert analyzers.train_split_name(["validation", "train"]) == "train"
    assert analyzers.train_split_name(["fit", "holdout"]) == "fit"


def test_pipeline_output_normalization_matches_the_written_train_pixels(tmp_path_factory):
    """End to end: PNG shards hold exactly the pixels the analyzers summed."""
    out = stats_outputs.base_output(tmp_path_factory)
    manifest = read_manifest(str(out)).to_json()
    numbers = transform_output.normalization_from_transform_output(
        str(out / manifest["transform_output"]))
    pixels, labels = [], []
    for shard in manifest["splits"]["train"]["shards"]:
        for raw in tf.data.TFRecordDataset(str(out / shard["path"])):
            example = tf.io.parse_single_example(raw, records.FEATURE_SPEC)
            pixels.append(tf.io.decode_png(example[records.ENCODED], channels=3).numpy())
            labels.extend(v.decode() for v in example[records.LABEL_TEXT].values.numpy())
    flat = np.stack(pixels).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(numbers["mean"], flat.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(numbers["std"], flat.std(axis=0), rtol=1e-4)
    expected = {k: v for k, v in manifest["splits"]["train"]["class_counts"].items() if v}
    assert numbers["label_frequencies"] == expected

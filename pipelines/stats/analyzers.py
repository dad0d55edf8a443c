"""tf.Transform over the train split: per-channel pixel mean/std and the label vocabulary.

The cheap formulation: decoding already sums each image's resized uint8 pixels and
their squares per channel (`ImageMeta.channel_sums`, `.channel_squared_sums`, over
H*W pixels). The analyzers only add those up, so they see 7 floats and a label list
per image instead of H*W*3 pixels:

    mean = sum(channel_sums) / sum(pixel_count)
    std  = sqrt(sum(channel_squared_sums) / sum(pixel_count) - mean^2)

The sums run in float64 inside the graph (the features are float32, which holds a
224x224 image's integer channel sum exactly but would lose digits summed over a
dataset). Pixel values are 0..255, the stored pixels the model will see (resized,
padded for --resize pad).

Labels are multi-valued (one image can carry several): the `label` feature is a
VarLen string list and the vocabulary counts each label once per train image that
carries it, which is also how the manifest's `class_counts` and the statistics'
label histogram count. The vocabulary is for frequencies and statistics; the model's
label ids stay the manifest's sorted `labels`.

Outputs under `<output>/transform_output/` (what `tft.TFTransformOutput` reads):
`transform_fn/` (the SavedModel, vocabulary asset `labels`) and `transformed_metadata/`.
The trainer reads the numbers back (`pipelines.contract.transform_output`) and bakes
them into the model, so serving carries them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.contract import records
from pipelines.contract.transform_output import (  # the names the transform output carries
    CHANNEL_SQUARED_SUMS,
    CHANNEL_SUMS,
    LABEL,
    LABEL_VOCABULARY,
    PIXEL_COUNT,
    PIXEL_MEAN,
    PIXEL_STD,
    TRANSFORM_OUTPUT,
)


def raw_feature_spec() -> dict:
    """The analyzers' input features (a function: importing this module must not load
    TensorFlow, which a pipeline run without statistics never needs)."""
    import tensorflow as tf

    return {
        CHANNEL_SUMS: tf.io.FixedLenFeature([3], tf.float32),
        CHANNEL_SQUARED_SUMS: tf.io.FixedLenFeature([3], tf.float32),
        PIXEL_COUNT: tf.io.FixedLenFeature([], tf.float32),
        LABEL: tf.io.VarLenFeature(tf.string),
    }


def preprocessing_fn(inputs: dict) -> dict:
    """tf.Transform preprocessing_fn over per-image pixel sums and labels.

    Args:
      inputs: batch of `raw_feature_spec()` features: `channel_sums` and
        `channel_squared_sums` float32 [batch, 3], `pixel_count` float32 [batch],
        `label` string SparseTensor [batch, None].
    Returns:
      `pixel_mean`, `pixel_std`: float32 [batch, 3], the train split's per-channel
      mean and standard deviation of 0..255 pixels (the same row for every instance).
      The label vocabulary with frequencies is the asset `labels`
      (`TFTransformOutput.vocabulary_by_name`); no output applies it: the model's label
      ids are the manifest's, and a lookup table would only make the transform slower to
      build, write and load.
    """
    import tensorflow as tf
    import tensorflow_transform as tft  # heavy import: only where the graph is traced

    # One analyzer over the 7 columns, not three: tf.Transform's fixed cost grows with its
    # analyzer count (same float64 sums).
    columns = tf.concat([tf.cast(inputs[CHANNEL_SUMS], tf.float64),
                         tf.cast(inputs[CHANNEL_SQUARED_SUMS], tf.float64),
                         tf.cast(inputs[PIXEL_COUNT], tf.float64)[:, tf.newaxis]], axis=1)
    totals = tft.sum(columns, reduce_instance_dims=False)  # [7]
    sums, squares, pixels = totals[:3], totals[3:6], totals[6]
    mean = tf.math.divide_no_nan(sums, pixels)
    # E[x^2] - E[x]^2 in float64; clipped at 0 against rounding on constant images.
    variance = tf.maximum(tf.math.divide_no_nan(squares, pixels) - tf.square(mean), 0.0)
    per_instance = tf.zeros_like(inputs[CHANNEL_SUMS])  # [batch, 3]
    tft.vocabulary(inputs[LABEL], vocab_filename=LABEL_VOCABULARY, store_frequency=True)
    return {
        PIXEL_MEAN: per_instance + tf.cast(mean, tf.float32),
        PIXEL_STD: per_instance + tf.cast(tf.sqrt(variance), tf.float32),
    }


def serialized_instance(
    channel_sums: Iterable[float],
    channel_squared_sums: Iterable[float],
    pixel_count: int,
    labels: Iterable[str],
) -> bytes:
    """One image's analyzer input as a serialized tf.Example (`raw_feature_spec()`)."""
    return records.serialize_example({
        CHANNEL_SUMS: records.float_feature(list(channel_sums)),
        CHANNEL_SQUARED_SUMS: records.float_feature(list(channel_squared_sums)),
        PIXEL_COUNT: records.float_feature([float(pixel_count)]),
        LABEL: records.bytes_feature([label.encode() for label in labels]),
    })


def train_split_name(split_names: Iterable[str]) -> str:
    """The split the analyzers see: `train` if there is one, else the first split."""
    names = list(split_names)
    return "train" if "train" in names else names[0]


class TrainInstances(beam.PTransform):
    """UniqueImage (every split) -> the train split's analyzer instances (serialized
    tf.Examples of `raw_feature_spec()`: 7 floats and the labels of one image)."""

    def __init__(self, train_split: str, pixel_count: int):
        super().__init__()
        self._train_split = train_split
        self._pixel_count = pixel_count

    def expand(self, unique_images):
        train, pixel_count = self._train_split, self._pixel_count
        return (
            unique_images
            | "TrainOnly" >> beam.Filter(lambda image: image.split == train)
            | "ToAnalyzerInput" >> beam.Map(lambda image: serialized_instance(
                image.meta.channel_sums, image.meta.channel_squared_sums, pixel_count,
                image.labels))
        )


class AnalyzeInstances(beam.PTransform):
    """Serialized analyzer instances -> tf.Transform's transform output, written to
    local-or-remote folder `write_dir` (temp files under `temp_dir`); the output
    PCollection has one element once it is written.

    `tft_beam.AnalyzeDataset(preprocessing_fn)` + `tft_beam.WriteTransformFn`. Both
    places the analysis runs use this: inside the pipeline (`AnalyzeTrainSplit`) and in
    the local runs' analysis process (`pipelines.local.analysis_process`).
    """

    def __init__(self, write_dir: str, temp_dir: str):
        super().__init__()
        self._write_dir = write_dir
        self._temp_dir = temp_dir

    def expand(self, serialized_instances):
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import schema_utils
        from tfx_bsl.tfxio import tf_example_record

        tfxio = tf_example_record.TFExampleBeamRecord(
            physical_format="inmem",
            telemetry_descriptors=["imagebeam"],
            schema=schema_utils.schema_from_feature_spec(raw_feature_spec()),
        )
        # Arrow RecordBatches, what tf.Transform analyzes
        record_batches = serialized_instances | "ToRecordBatches" >> tfxio.BeamSource()
        with tft_beam.Context(temp_dir=self._temp_dir):
            transform_fn = (record_batches, tfxio.TensorAdapterConfig()) | (
                "Analyze" >> tft_beam.AnalyzeDataset(preprocessing_fn))
            return transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(
                self._write_dir)


class AnalyzeTrainSplit(beam.PTransform):
    """UniqueImage (every split) -> the relative path `transform_output`, once written.

    Runs `AnalyzeInstances` (tf.Transform) on the train split's images only, inside the
    pipeline (what remote runners do; local runs hand the instances to
    `pipelines.local.analysis_process` instead).

    Where tf.Transform writes: its SavedModel writer goes through TensorFlow's own
    file systems, which cannot reach a GCS emulator. With a local runner (`staging`
    given: a local folder) it writes there and the result is copied to
    `<output>/transform_output` through Beam's FileSystems (local or gs://); on a
    remote runner it writes to the output directly, its temp files under `_tmp/`.
    """

    def __init__(self, output: str, train_split: str, pixel_count: int,
                 staging: str | None = None):
        super().__init__()
        self._output = output
        self._train_split = train_split
        self._pixel_count = pixel_count
        self._staging = staging

    def expand(self, unique_images):
        final = FileSystems.join(self._output, TRANSFORM_OUTPUT)
        if self._staging:
            temp_dir = os.path.join(self._staging, "tmp")
            write_dir = os.path.join(self._staging, TRANSFORM_OUTPUT)
        else:
            temp_dir = FileSystems.join(self._output, "_tmp", "tft")
            write_dir = final
        written = (
            unique_images
            | "TrainInstances" >> TrainInstances(self._train_split, self._pixel_count)
            | "AnalyzeInstances" >> AnalyzeInstances(write_dir, temp_dir)
        )
        staging = self._staging

        def publish(_) -> str:
            if staging:
                copy_local_tree(os.path.join(staging, TRANSFORM_OUTPUT), final)
                shutil.rmtree(staging, ignore_errors=True)
            return TRANSFORM_OUTPUT

        return written | "Publish" >> beam.Map(publish)


def local_staging_dir() -> str:
    """A new local folder name for tf.Transform's files on a local runner; created only
    when tf.Transform writes there (a pipeline built but never run leaves nothing)."""
    return os.path.join(tempfile.gettempdir(), f"imagebeam-tft-{uuid.uuid4().hex[:12]}")


def copy_local_tree(source: str, destination: str) -> None:
    """Copies every file under local folder `source` to `destination` (local or gs://)."""
    for folder, _, names in os.walk(source):
        relative = os.path.relpath(folder, source)
        for name in names:
            parts = [] if relative == "." else relative.split(os.sep)
            target = FileSystems.join(destination, *parts, name)
            # UNCOMPRESSED: by default Beam compresses a file whose name ends in .gz
            with open(os.path.join(folder, name), "rb") as src, FileSystems.create(
                target, compression_type=CompressionTypes.UNCOMPRESSED
            ) as dst:
                shutil.copyfileobj(src, dst)

"""What a preprocess output's `transform_output/` holds, and reading it back.

`pipelines.stats.analyzers` writes it with tf.Transform; the trainer reads the pixel
mean/std and the label frequencies from it (`normalization_from_transform_output`) and
bakes them into the model. The feature names below are that contract.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

TRANSFORM_OUTPUT = "transform_output"  # relative to the output root
LABEL_VOCABULARY = "labels"  # vocab_filename: transform_fn/assets/labels
_SPACE_ESCAPE = "__SPACE__"  # how tft stores spaces in a frequency vocabulary

CHANNEL_SUMS = "channel_sums"
CHANNEL_SQUARED_SUMS = "channel_squared_sums"
PIXEL_COUNT = "pixel_count"
LABEL = "label"

PIXEL_MEAN = "pixel_mean"  # outputs: the dataset constants, broadcast per instance
PIXEL_STD = "pixel_std"


def normalization_from_transform_output(path: str) -> dict:
    """The numbers the trainer bakes into the model, read from a transform output.

    Args:
      path: a `transform_output` folder (manifest root joined with
        `manifest["transform_output"]`), readable by TensorFlow's file systems.
    Returns:
      {"mean": float32 [3] and "std": float32 [3], per-channel statistics of the train
      split's 0..255 RGB pixels (normalize as (x - mean) / std);
      "labels": the train split's labels, sorted (NOT necessarily the model's label
      ids: those are the manifest's `labels`, which also has labels only other
      splits carry); "label_frequencies": {label: number of train images carrying it}}.
      An empty train split gives mean and std 0 and no labels.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    output = tft.TFTransformOutput(path)
    dummy = {
        CHANNEL_SUMS: tf.zeros([1, 3], tf.float32),
        CHANNEL_SQUARED_SUMS: tf.zeros([1, 3], tf.float32),
        PIXEL_COUNT: tf.ones([1], tf.float32),
        LABEL: tf.sparse.from_dense(tf.constant([[""]])),
    }
    transformed = output.transform_raw_features(dummy)
    frequencies = parse_frequency_vocabulary(output.vocabulary_by_name(LABEL_VOCABULARY))
    return {
        "mean": np.asarray(transformed[PIXEL_MEAN].numpy()[0], dtype=np.float32),
        "std": np.asarray(transformed[PIXEL_STD].numpy()[0], dtype=np.float32),
        "labels": sorted(frequencies),
        "label_frequencies": frequencies,
    }


def parse_frequency_vocabulary(lines: Iterable[bytes]) -> dict[str, int]:
    """tft `store_frequency` vocabulary lines (b"<count> <label>") -> {label: count}.

    tf.Transform writes a placeholder token into an empty vocabulary; it is dropped.
    """
    import tensorflow as tf
    from tensorflow_transform.analyzers import get_empy_vocabulary_dummy_value

    placeholder = get_empy_vocabulary_dummy_value(tf.string)[1].decode()
    frequencies = {}
    for line in lines:
        text = line.decode("utf-8").rstrip("\r\n")
        if not text or text.partition(" ")[2] == placeholder:
            continue
        count, _, label = text.partition(" ")
        frequencies[label.replace(_SPACE_ESCAPE, " ")] = int(float(count))
    return frequencies

"""The data contract: one `tf.train.Example` per unique image content.

Keys follow the TF ecosystem (TFDS, the Object Detection API). Readers
(trainer, statistics, report) parse with `FEATURE_SPEC`; nothing else should
spell these keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
LABEL = "image/class/label"
LABEL_TEXT = "image/class/text"
SOURCE_ID = "image/source_id"
SHA256 = "image/key/sha256"
ORIGINAL_HEIGHT = "image/original/height"
ORIGINAL_WIDTH = "image/original/width"

FEATURE_SPEC = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    FORMAT: tf.io.FixedLenFeature([], tf.string),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    LABEL: tf.io.VarLenFeature(tf.int64),
    LABEL_TEXT: tf.io.VarLenFeature(tf.string),
    SOURCE_ID: tf.io.VarLenFeature(tf.string),
    SHA256: tf.io.FixedLenFeature([], tf.string),
    ORIGINAL_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    ORIGINAL_WIDTH: tf.io.FixedLenFeature([], tf.int64),
}


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def make_example(
    *,
    encoded: bytes,
    image_format: str,
    height: int,
    width: int,
    label_ids: Sequence[int],
    labels: Sequence[str],
    source_uris: Sequence[str],
    sha256: str,
    original_height: int,
    original_width: int,
) -> bytes:
    """Serialised Example; `deterministic=True` fixes the map order so bytes repeat."""
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                ENCODED: _bytes([encoded]),
                FORMAT: _bytes([image_format.encode()]),
                HEIGHT: _ints([height]),
                WIDTH: _ints([width]),
                LABEL: _ints(label_ids),
                LABEL_TEXT: _bytes([label.encode() for label in labels]),
                SOURCE_ID: _bytes([uri.encode() for uri in source_uris]),
                SHA256: _bytes([sha256.encode()]),
                ORIGINAL_HEIGHT: _ints([original_height]),
                ORIGINAL_WIDTH: _ints([original_width]),
            }
        )
    )
    return example.SerializeToString(deterministic=True)

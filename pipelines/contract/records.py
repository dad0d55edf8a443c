"""The data contract: one `tf.train.Example` per unique image content.

Keys follow the TF ecosystem (TFDS, the Object Detection API). Readers
(trainer, statistics, report) parse with `FEATURE_SPEC`; nothing else should
spell these keys.

Writing does not import TensorFlow: `make_example` emits the Example wire format
directly (a test holds it byte-equal to `tf.train.Example.SerializeToString(
deterministic=True)`). Importing TensorFlow is a large fixed cost for each Beam worker
process, which a run without statistics never needs to pay.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import BinaryIO

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


def __getattr__(name: str):
    if name == "FEATURE_SPEC":  # built on first use, so writers never load TensorFlow
        return feature_spec()
    raise AttributeError(name)


def feature_spec() -> dict:
    """`tf.io.parse_example` spec of the contract's keys."""
    import tensorflow as tf

    return {
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


_ONE_BYTE_VARINTS = tuple(bytes((value,)) for value in range(0x80))


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:  # tags, short lengths, small ints: most calls (~2x faster)
        return _ONE_BYTE_VARINTS[value]
    value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bytes_feature(values: Sequence[bytes]) -> bytes:
    """An encoded Feature message holding `values` as a bytes list."""
    # Feature.bytes_list = 1 -> BytesList.value = 1 (repeated bytes)
    return _field(1, b"".join(_field(1, v) for v in values))


def _int64_feature(values: Sequence[int]) -> bytes:
    # Feature.int64_list = 3 -> Int64List.value = 1 (packed varints)
    packed = b"".join(_varint(v) for v in values)
    return _field(3, _field(1, packed) if values else b"")


def float_feature(values: Sequence[float]) -> bytes:
    """An encoded Feature message holding `values` as float32."""
    # Feature.float_list = 2 -> FloatList.value = 1 (packed little-endian float32)
    packed = struct.pack(f"<{len(values)}f", *values)
    return _field(2, _field(1, packed) if values else b"")


def serialize_example(features: dict[str, bytes]) -> bytes:
    """Example{features: Features{feature: map}} from encoded Feature messages.

    Map entries sorted by key, as protobuf's deterministic serialisation does.
    """
    return _serialize_with_offsets(features)[0]


def _serialize_with_offsets(features: dict[str, bytes]) -> tuple[bytes, dict[str, int]]:
    """The serialised Example and where each Feature message starts in it."""
    entries, starts = [], {}
    position = 0
    for key in sorted(features):
        key_field = _field(1, key.encode())
        value_header = _varint(2 << 3 | 2) + _varint(len(features[key]))
        entry_body = key_field + value_header + features[key]
        entry_header = _varint(1 << 3 | 2) + _varint(len(entry_body))
        starts[key] = position + len(entry_header) + len(key_field) + len(value_header)
        entries.append(entry_header + entry_body)
        position += len(entries[-1])
    body = b"".join(entries)
    outer_header = _varint(1 << 3 | 2) + _varint(len(body))
    return outer_header + body, {k: v + len(outer_header) for k, v in starts.items()}


def make_example(**fields) -> bytes:
    """One serialised `tf.train.Example` of the contract (deterministic bytes).

    Keyword arguments: see `example_features`.
    """
    return make_example_locating_image(**fields)[0]


def make_example_locating_image(**fields) -> tuple[bytes, int]:
    """`make_example`, plus the offset of the `image/encoded` bytes in the record.

    Lets a later run reuse an image straight out of this run's shards, by offset,
    without parsing or decoding anything.
    """
    features = example_features(**fields)
    record, starts = _serialize_with_offsets(features)
    # The encoded bytes are the tail of their Feature message (BytesList of one value).
    return record, starts[ENCODED] + len(features[ENCODED]) - len(fields["encoded"])


def example_features(
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
) -> dict[str, bytes]:
    """The contract's keys -> encoded Feature messages."""
    return {
        ENCODED: bytes_feature([encoded]),
        FORMAT: bytes_feature([image_format.encode()]),
        HEIGHT: _int64_feature([height]),
        WIDTH: _int64_feature([width]),
        LABEL: _int64_feature(label_ids),
        LABEL_TEXT: bytes_feature([label.encode() for label in labels]),
        SOURCE_ID: bytes_feature([uri.encode() for uri in source_uris]),
        SHA256: bytes_feature([sha256.encode()]),
        ORIGINAL_HEIGHT: _int64_feature([original_height]),
        ORIGINAL_WIDTH: _int64_feature([original_width]),
    }


def read_records(handle: BinaryIO) -> Iterator[bytes]:
    """The records of an open TFRecord file, in order (Beam's framing reader: no
    TensorFlow; imported here, so trainers that import this module do not load Beam)."""
    from apache_beam.io.tfrecordio import _TFRecordUtil

    while (record := _TFRecordUtil.read_record(handle)) is not None:
        yield record


def parse_example(record: bytes) -> dict[str, list]:
    """A serialized tf.train.Example -> {key: values}: a list of bytes, int or float.

    The wire format read directly, as `serialize_example` writes it: parsing with
    TensorFlow's `example_pb2` would load all of TensorFlow into a process that
    otherwise never needs it. Follows protobuf's rules: a sub-message that occurs twice
    is merged (its occurrences concatenated), a map key that occurs twice keeps the last
    value, a oneof keeps its last member, numbers may be packed or not, fields with an
    unknown number or an unexpected wire type are skipped. ValueError on a malformed
    record. Tests hold it equal to TensorFlow's parser.
    """
    parsed: dict[str, list] = {}
    # Example.features (1) -> Features.feature (1): map<string, Feature> entries
    for number, wire_type, entry in _fields(_merged(record, 1)):
        if number != 1 or wire_type != 2:
            continue
        key, feature = b"", b""
        for entry_number, entry_type, value in _fields(entry):
            if entry_type != 2:
                continue
            if entry_number == 1:
                key = value
            elif entry_number == 2:
                feature += value  # a message field occurring twice merges
        parsed[key.decode()] = _feature_values(feature)
    return parsed


def _merged(message: bytes, wanted: int) -> bytes:
    """Field `wanted` of `message`, a sub-message: its occurrences concatenated, which is
    how protobuf merges them."""
    return b"".join(value for number, wire_type, value in _fields(message)
                    if number == wanted and wire_type == 2)


def _feature_values(feature: bytes) -> list:
    """Feature's oneof: 1 bytes_list, 2 float_list, 3 int64_list (the last member wins;
    the same member twice merges)."""
    kind, values = None, []
    for number, wire_type, payload in _fields(feature):
        if number not in (1, 2, 3) or wire_type != 2:
            continue
        if number != kind:
            kind, values = number, []
        values.extend(_list_values(number, payload))
    return values


def _list_values(kind: int, payload: bytes) -> list:
    values: list = []
    for number, wire_type, value in _fields(payload):
        if number != 1:
            continue
        if kind == 1 and wire_type == 2:
            values.append(value)
        elif kind == 2 and wire_type in (2, 5):  # packed, or one fixed32 per tag
            if len(value) % 4:
                raise ValueError(f"packed float list of {len(value)} bytes")
            values.extend(struct.unpack(f"<{len(value) // 4}f", value))
        elif kind == 3 and wire_type == 2:  # packed varints
            values.extend(_signed(v) for v in _varints(value))
        elif kind == 3 and wire_type == 0:
            values.append(_signed(value))
    return values


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(message: bytes):
    """(field number, wire type, value) of each field: int for varints, bytes else."""
    position, end = 0, len(message)
    while position < end:
        tag, position = _read_varint(message, position)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("protobuf field number 0")
        if wire_type == 0:
            value, position = _read_varint(message, position)
        elif wire_type == 2:
            length, position = _read_varint(message, position)
            value, position = message[position:position + length], position + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, position = message[position:position + size], position + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if position > end:
            raise ValueError("truncated protobuf message")
        yield number, wire_type, value


def _varints(packed: bytes) -> list[int]:
    values, position = [], 0
    while position < len(packed):
        value, position = _read_varint(packed, position)
        values.append(value)
    return values


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & ((1 << 64) - 1), position  # as protobuf: the low 64 bits
        shift += 7

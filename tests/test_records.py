"""The hand-written Example encoder is byte-equal to TensorFlow's own."""

import struct

import pytest
import tensorflow as tf

from pipelines.contract import records


def tf_example(**kw) -> bytes:
    def b(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    def i(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    feature = {
        records.ENCODED: b([kw["encoded"]]),
        records.FORMAT: b([kw["image_format"].encode()]),
        records.HEIGHT: i([kw["height"]]),
        records.WIDTH: i([kw["width"]]),
        records.LABEL: i(kw["label_ids"]),
        records.LABEL_TEXT: b([x.encode() for x in kw["labels"]]),
        records.SOURCE_ID: b([x.encode() for x in kw["source_uris"]]),
        records.SHA256: b([kw["sha256"].encode()]),
        records.ORIGINAL_HEIGHT: i([kw["original_height"]]),
        records.ORIGINAL_WIDTH: i([kw["original_width"]]),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


CASES = [
    dict(encoded=b"\xff\xd8" + bytes(range(256)) * 40, image_format="jpeg", height=224,
         width=160, label_ids=[0, 3, 300], labels=["cat", "dög", "x"],
         source_uris=["gs://b/raw/cat/1.jpg", "/local/a b.png"], sha256="ab" * 32,
         original_height=3000, original_width=4000),
    dict(encoded=b"", image_format="raw", height=1, width=1, label_ids=[], labels=[],
         source_uris=[], sha256="", original_height=0, original_width=2**40),
]


@pytest.mark.parametrize("kw", CASES)
def test_make_example_matches_tensorflow_bytes(kw):
    assert records.make_example(**kw) == tf_example(**kw)


def test_feature_spec_parses_what_make_example_writes():
    raw = records.make_example(encoded=b"x", image_format="png", height=2, width=3,
                               label_ids=[1, 2], labels=["a", "b"], source_uris=["u"],
                               sha256="s", original_height=4, original_width=5)
    parsed = tf.io.parse_single_example(raw, records.FEATURE_SPEC)
    assert tf.sparse.to_dense(parsed[records.LABEL]).numpy().tolist() == [1, 2]
    assert int(parsed[records.ORIGINAL_WIDTH]) == 5


def test_encoded_image_is_located_by_offset():
    encoded = bytes(range(200)) * 3
    record, offset = records.make_example_locating_image(
        encoded=encoded, image_format="jpeg", height=2, width=3, label_ids=[1],
        labels=["a" * 300], source_uris=["u" * 200], sha256="s", original_height=4,
        original_width=5)
    assert record[offset:offset + len(encoded)] == encoded


@pytest.mark.parametrize("sums,labels", [
    ((1.5e7, 2.25e7, 0.0), ["cat", "sea lion"]),
    ((0.0, 0.0, 0.0), []),
])
def test_analyzer_instances_match_tensorflow_bytes(sums, labels):
    from pipelines.stats import analyzers

    def floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    expected = tf.train.Example(features=tf.train.Features(feature={
        analyzers.CHANNEL_SUMS: floats(sums),
        analyzers.CHANNEL_SQUARED_SUMS: floats([s * 300 for s in sums]),
        analyzers.PIXEL_COUNT: floats([50176.0]),
        analyzers.LABEL: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[label.encode() for label in labels])),
    })).SerializeToString(deterministic=True)
    assert analyzers.serialized_instance(sums, [s * 300 for s in sums], 50176,
                                         labels) == expected


def test_building_the_pipeline_modules_does_not_load_tensorflow():
    # A run without statistics never needs it; tf.Transform loads it when it is used.
    import subprocess
    import sys

    probe = "import sys, pipelines.preprocess; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def _tf_example_values(example: tf.train.Example) -> dict:
    parsed = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        parsed[key] = list(getattr(feature, kind).value) if kind else []
    return parsed


@pytest.mark.parametrize("kw", CASES)
def test_parse_example_reads_what_make_example_writes(kw):
    record = records.make_example(**kw)
    assert records.parse_example(record) == _tf_example_values(
        tf.train.Example.FromString(record))


def test_parse_example_reads_any_encoding_tensorflow_accepts():
    example = tf.train.Example()
    feature = example.features.feature
    feature["negative"].int64_list.value.extend([-1, -(2**63), 2**63 - 1, 0])
    feature["floats"].float_list.value.extend([0.5, -2.25, 1e30])
    feature["bytes"].bytes_list.value.extend([b"", b"\x00\xff", "é".encode()])
    feature["empty"].int64_list.SetInParent()
    feature["unset"].SetInParent()
    record = example.SerializeToString()
    assert records.parse_example(record) == _tf_example_values(
        tf.train.Example.FromString(record))
    # Numbers unpacked (one tag per value), which protobuf also accepts and writes for
    # some languages: Int64List/FloatList field 1 as varints (wire type 0) and fixed32 (5).
    ints = records._field(3, b"\x08" + records._varint(7) + b"\x08" + records._varint(-3))
    floats = records._field(2, b"\x0d" + struct.pack("<f", 1.5) + b"\x0d"
                            + struct.pack("<f", -4.0))
    record = records.serialize_example({"ints": ints, "floats": floats})
    expected = _tf_example_values(tf.train.Example.FromString(record))
    assert expected == {"ints": [7, -3], "floats": [1.5, -4.0]}
    assert records.parse_example(record) == expected


def test_parse_example_refuses_truncated_records():
    record = records.make_example(**CASES[0])
    with pytest.raises(ValueError):
        records.parse_example(record[:-3])


def test_parse_example_merges_and_skips_as_protobuf_does():
    field, varint = records._field, records._varint
    twice = (field(1, field(1, field(1, b"a") + field(2, records.bytes_feature([b"x"]))))
             + field(1, field(1, field(1, b"b") + field(2, records.bytes_feature([b"y"])))))
    in_one_feature = records.serialize_example(
        {"k": records.bytes_feature([b"x"]) + records.bytes_feature([b"y"])})
    member_replaced = records.serialize_example(
        {"k": records.bytes_feature([b"x"]) + records.float_feature([2.0])})
    wrong_wire_type = records.serialize_example(  # bytes_list value as a varint: skipped
        {"k": field(1, varint(1 << 3 | 0) + varint(1) + field(1, b"z"))})
    overlong = records.serialize_example(  # ten-byte -1 with a stray high bit: low 64 bits
        {"k": field(3, field(1, b"\xff" * 9 + b"\x7f"))})
    for record in (twice, in_one_feature, member_replaced, wrong_wire_type, overlong):
        expected = _tf_example_values(tf.train.Example.FromString(record))
        assert records.parse_example(record) == expected
    assert records.parse_example(twice) == {"a": [b"x"], "b": [b"y"]}
    assert records.parse_example(in_one_feature) == {"k": [b"x", b"y"]}
    assert records.parse_example(overlong) == {"k": [-1]}


def test_parse_example_raises_value_error_on_bad_lengths():
    bad_floats = records.serialize_example({"k": records._field(2, records._field(1, b"abc"))})
    with pytest.raises(ValueError):
        records.parse_example(bad_floats)

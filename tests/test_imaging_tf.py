"""The serving graph's decode/resize (`imaging_tf`) against the pipeline's (`imaging`, PIL).

Real encoded files of every format the pipeline reads, every EXIF orientation in both
byte orders and three containers, and every resize mode: pixels within a level or so,
orientation and sizes exact.
"""

import io
import struct
import warnings
from collections import defaultdict

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines.contract import imaging, imaging_tf
from pipelines.contract.imaging import ResizeMode
from tests import corpus, fuzz_images
from trainer import serving

TARGETS = [((64, 64), ResizeMode.SQUASH), ((40, 56), ResizeMode.CROP), ((56, 40), ResizeMode.PAD)]


def photo(height: int = 300, width: int = 400) -> Image.Image:
    """A real photo (scikit-image's astronaut), so JPEG and resize see real texture."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BILINEAR)


def exif_block(orientation: int, big_endian: bool) -> bytes:
    """A minimal `Exif\\0\\0` + TIFF block with IFD0 = {0x0112: orientation} and one other tag."""
    e = ">" if big_endian else "<"
    entries = struct.pack(e + "HHII", 0x010F, 2, 4, 0x41424300)  # Make = 'ABC'
    entries += struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    return b"Exif\x00\x00" + tiff + struct.pack(e + "H", 2) + entries + struct.pack(e + "I", 0)


def with_xmp_first(jpeg: bytes) -> bytes:
    """Puts an XMP APP1 segment right after SOI: the walker must skip it, not stop at it."""
    payload = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def files() -> dict[str, bytes]:
    """name -> encoded bytes: the test corpus' every encoding plus photos that exercise
    JPEG draft scales, EXIF in JPEG/PNG/WebP and both byte orders."""
    found = dict(corpus.every_encoding())
    big = photo()
    found["photo.jpg"] = corpus.encode(big, "JPEG", quality=90)
    found["photo-progressive.jpg"] = corpus.encode(big, "JPEG", quality=90, progressive=True)
    found["photo-cmyk.jpg"] = corpus.encode(big.convert("CMYK"), "JPEG", quality=90)
    found["photo.webp"] = corpus.encode(big, "WEBP", quality=90)
    found["photo-lossless.webp"] = corpus.encode(big.resize((200, 150)), "WEBP", lossless=True)
    found["photo-rgba.webp"] = corpus.encode(big.resize((200, 150)).convert("RGBA"), "WEBP")
    for orientation in range(1, 9):
        found[f"o{orientation}-le.jpg"] = corpus.encode(
            big, "JPEG", quality=90, exif=exif_block(orientation, big_endian=False))
        found[f"o{orientation}-be.jpg"] = with_xmp_first(corpus.encode(
            big, "JPEG", quality=90, exif=exif_block(orientation, big_endian=True)))
    found["palette.bmp"] = corpus.encode(big.resize((120, 90)).convert("P"), "BMP")
    small = big.resize((120, 90))
    found["o6.png"] = corpus.encode(small, "PNG", exif=exif_block(6, big_endian=True))
    found["o8.webp"] = corpus.encode(small, "WEBP", quality=90, exif=exif_block(8, False))
    found["o5.webp"] = corpus.encode(small, "WEBP", lossless=True, exif=exif_block(5, True))
    return found


FILES = files()


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def _orientation(data):
    return imaging_tf.exif_orientation(data)


_process = {
    (target, mode): tf.function(
        lambda data, target=target, mode=mode: imaging_tf.process_image(data, target, mode),
        input_signature=[tf.TensorSpec([], tf.string)],
    )
    for target, mode in TARGETS
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_pixels_match_the_pipeline(name):
    data = FILES[name]
    for target, mode in TARGETS:
        expected = imaging.resize(imaging.decode_rgb(data, target)[0], target, mode)
        got = _process[target, mode](tf.constant(data)).numpy()
        assert got.shape == expected.shape == (*target, 3)
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 3, (name, mode, diff.mean(), diff.max())


@pytest.mark.parametrize("name", sorted(FILES))
def test_orientation_is_exactly_pils(name):
    data = FILES[name]
    expected = imaging.exif_orientation(imaging.open_header(data))
    assert int(_orientation(tf.constant(data))) == expected
    if name.startswith("o") and name[1].isdigit():
        assert expected == int(name[1]), "the test file must carry the orientation it names"


def test_draft_and_orientation_give_pils_decoded_size():
    # Upright targets that make PIL pick different DCT scales, and differ when transposed.
    targets = [(36, 36), (30, 140), (140, 30)]
    decode = {t: tf.function(lambda d, t=t: imaging_tf.decode_rgb(d, t)) for t in targets}
    for name in ["o6-be.jpg", "o7-le.jpg", "photo.jpg", "photo-progressive.jpg", "o5.webp"]:
        data = FILES[name]
        for target in targets:
            expected = imaging.decode_rgb(data, target)[0]
            got = decode[target](tf.constant(data))
            assert tuple(got.shape) == expected.shape, (name, target)


def test_works_eagerly_and_inside_tf_data():
    data = corpus.jpeg_with_orientation(corpus.two_halves(40, 60), orientation=8)
    eager = imaging_tf.process_image(tf.constant(data), (32, 32)).numpy()
    mapped = next(iter(tf.data.Dataset.from_tensors(data).map(
        lambda d: imaging_tf.process_image(d, (32, 32)))))
    np.testing.assert_array_equal(eager, mapped.numpy())


def test_upright_picture_is_upright():
    data = corpus.jpeg_with_orientation(corpus.two_halves(40, 60), orientation=6)
    pixels = imaging_tf.decode_rgb(tf.constant(data)).numpy()
    assert pixels.shape == (40, 60, 3)
    assert pixels[:, :25, 0].mean() > 180 and pixels[:, 35:, 2].mean() > 180  # red | blue


@pytest.mark.parametrize("data, message", [
    (corpus.png_bomb(), "too_many_pixels"),
    # Under max_pixels, but 9 Mpx from ~100 bytes: more than deflate can inflate to.
    (corpus.png_bomb(3000, 3000), "too_many_pixels"),
    (b"<!doctype html><html>404</html>", "not_an_image"),
])
def test_bombs_and_non_images_are_refused(data, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        imaging_tf.process_image(tf.constant(data), (32, 32), max_pixels=10_000_000)
    # The pipeline refuses the same file for the same reason.
    with pytest.raises(imaging.DecodeError) as refused:
        imaging.process_image(data, imaging.ImageSpec(32, 32, max_pixels=10_000_000))
    assert refused.value.reason == message


def test_declared_size_of_every_format():
    for name in ["photo.jpg", "photo.webp", "photo-lossless.webp", "photo-rgba.webp", "rgb.png",
                 "anim.gif", "plain.bmp", "o6.png"]:
        data = FILES[name]
        width, height = Image.open(io.BytesIO(data)).size
        fmt = imaging_tf.image_format(tf.constant(data))
        got = imaging_tf.declared_size(tf.constant(data), fmt).numpy().tolist()
        assert got == [height, width], name


# The ops that allocate and fill pixels; ExtractJpegShape and DecodeRaw only read headers.
DECODE_OPS = {"DecodeJpeg", "DecodeAndCropJpeg", "DecodeImage", "DecodePng", "DecodeGif",
              "DecodeBmp", "DecodeWebP"}
GUARD_REASONS = ("not_an_image", "too_many_pixels", "too_many_scans")


class CallTree:
    """A GraphDef's top level and its function library (branches of If/Case, While
    bodies, called functions) as one tree, to ask what an op waits for before it runs."""

    def __init__(self, graph_def: tf.compat.v1.GraphDef):
        bodies = {"": graph_def.node} | {f.signature.name: f.node_def
                                         for f in graph_def.library.function}
        self.nodes = {fn: {node.name: node for node in body} for fn, body in bodies.items()}
        self.callers = defaultdict(list)  # function -> [(calling function, node name)]
        for fn, nodes in self.nodes.items():
            for node in nodes.values():
                for callee in _callees(node):
                    self.callers[callee].append((fn, node.name))
        self._guards: dict[str, frozenset[str]] = {}

    def ops(self, types: set[str]) -> list[tuple[str, str]]:
        """(function, node name) of every op of `types`, at any depth."""
        return [(fn, name) for fn, nodes in self.nodes.items()
                for name, node in nodes.items() if node.op in types]

    def guards_inside(self, fn: str) -> frozenset[str]:
        """Messages of the guard Asserts in function `fn` or anything it calls."""
        if fn not in self._guards:
            self._guards[fn] = frozenset()  # recursion guard
            self._guards[fn] = frozenset().union(
                *(self._guards_of(fn, name) for name in self.nodes.get(fn, {})))
        return self._guards[fn]

    def _guards_of(self, fn: str, name: str) -> frozenset[str]:
        node = self.nodes[fn][name]
        found = set().union(*(self.guards_inside(callee) for callee in _callees(node)))
        if node.op == "Assert":
            for source in map(_node_name, node.input):
                const = self.nodes[fn].get(source)
                if const is not None and const.op == "Const" and const.attr["dtype"].type == (
                        tf.string.as_datatype_enum):
                    found.update(m.decode() for m in const.attr["value"].tensor.string_val
                                 if m.decode().startswith(GUARD_REASONS))
        return frozenset(found)

    def guards_before(self, fn: str, name: str) -> frozenset[str]:
        """Guard messages whose Asserts must have run before op `name` can: those among
        its data and control ancestors, then (through the function's arguments) those
        before every op that calls its function."""
        nodes, seen, todo = self.nodes[fn], set(), [name]
        while todo:
            for source in map(_node_name, nodes[todo.pop()].input):
                if source in nodes and source not in seen:
                    seen.add(source)
                    todo.append(source)
        found = frozenset().union(*(self._guards_of(fn, source) for source in seen))
        callers = self.callers.get(fn, [])
        if callers:
            found |= frozenset.intersection(*(self.guards_before(*c) for c in callers))
        return found


def _callees(node) -> list[str]:
    return [value.func.name for value in node.attr.values() if value.HasField("func")] + [
        f.name for value in node.attr.values() if value.HasField("list")
        for f in value.list.func]


def _node_name(graph_input: str) -> str:
    """'^a', 'a:1' (GraphDef) or 'a:output:0' (FunctionDef) -> 'a'."""
    return graph_input.lstrip("^").split(":")[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The `serving_default` signature of a tiny exported model, loaded back."""
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    path = str(tmp_path_factory.mktemp("served") / "saved_model")
    serving.export(model, path, ("a", "b"), 16, 16)
    return tf.saved_model.load(path).signatures[serving.SIGNATURE]


def test_served_graph_runs_every_guard_before_any_decoder(served):
    """In a graph an op runs once its inputs are ready, not in program order: a header
    check that no decoder depends on can fail after (or while) a 60000x60000 decode
    allocates gigabytes. Checked on the graph the SavedModel holds, at every depth."""
    tree = CallTree(served.graph.as_graph_def())
    guards = tree.guards_inside("")
    assert {m.split(":")[0] for m in guards} == set(GUARD_REASONS), guards
    decoders = tree.ops(DECODE_OPS)
    assert {tree.nodes[fn][name].op for fn, name in decoders} >= {"DecodeJpeg", "DecodeImage"}
    for fn, name in decoders:
        assert tree.guards_before(fn, name) == guards, (name, guards - tree.guards_before(
            fn, name))


def _header_refusal(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():  # PIL warns on the hostile EXIF blocks
            warnings.simplefilter("ignore")
            imaging.open_header(data)
    except imaging.DecodeError as err:
        return err.reason
    return None


# Crafted attacks (`tests/fuzz_images.py`) the pipeline refuses from the header alone.
REFUSED_FROM_HEADER = {
    name: reason for name, data in fuzz_images.hostile_images().items()
    if (reason := _header_refusal(data)) in GUARD_REASONS}


def test_crafted_progressive_jpegs_are_refused_from_the_header():
    assert REFUSED_FROM_HEADER["jpeg_progressive_60000x60000.jpg"] == "too_many_pixels"
    assert REFUSED_FROM_HEADER["jpeg_progressive_5000_scans.jpg"] == "too_many_scans"


@pytest.mark.parametrize("name", sorted(REFUSED_FROM_HEADER))
def test_crafted_attacks_are_refused_by_both_paths_for_one_reason(served, name):
    """Through the exported SavedModel, and through the pipeline's decode."""
    data, reason = fuzz_images.hostile_images()[name], REFUSED_FROM_HEADER[name]
    with pytest.raises(tf.errors.InvalidArgumentError, match=reason):
        served(image_bytes=tf.constant([data]))
    with pytest.raises(imaging.DecodeError) as refused:
        imaging.process_image(data, imaging.ImageSpec(16, 16))
    assert refused.value.reason == reason


def test_scan_count_is_the_pipelines():
    for name in ["photo.jpg", "photo-progressive.jpg", "o6-be.jpg", "rgb.png", "photo.webp"]:
        data = FILES[name]
        fmt = imaging_tf.image_format(tf.constant(data))
        expected = data.count(imaging.JPEG_SOS) if name.endswith(".jpg") else 0
        assert int(imaging_tf.jpeg_scans(tf.constant(data), fmt)) == expected, name


@pytest.mark.parametrize("target", [(64, 64), (128, 128), (224, 224), (57, 31)])
def test_resize_is_pils_two_passes(target):
    # Rows, then columns, rounded in between as PIL does: at most a level apart, and on
    # only a few values (one float pass over both sides was off on about a sixth).
    for name in ["photo.jpg", "photo-cmyk.jpg", "o6-le.jpg", "photo-lossless.webp"]:
        decoded = imaging.decode_rgb(FILES[name], target)[0]
        expected = imaging.resize(decoded, target, ResizeMode.SQUASH).astype(int)
        got = imaging_tf.resize(tf.constant(decoded), target, ResizeMode.SQUASH).numpy()
        diff = np.abs(got.astype(int) - expected)
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (name, target, np.mean(diff > 0))


@pytest.mark.parametrize("quality", [75, imaging.DEFAULT_JPEG_QUALITY, 95])
def test_stored_pixels_are_what_the_trainer_decodes_from_the_shards(quality):
    # TensorFlow's encoder with the pipeline's settings writes what PIL writes, so the
    # serving graph reproduces the stored pixels exactly, odd sizes (chroma) included.
    for target in [(64, 64), (224, 224), (57, 31)]:
        for name in ["photo.jpg", "palette.bmp", "o5.webp"]:
            resized = imaging.resize(imaging.decode_rgb(FILES[name], target)[0], target,
                                     ResizeMode.SQUASH)
            stored = imaging.encode(resized, imaging.ImageFormat.JPEG, quality)
            trainer_reads = tf.io.decode_jpeg(stored, channels=3, dct_method="INTEGER_ACCURATE")
            served = imaging_tf.stored_pixels(tf.constant(resized), "jpeg", quality)
            np.testing.assert_array_equal(served.numpy(), trainer_reads.numpy(),
                                          err_msg=f"{name} {target} q{quality}")
    lossless = tf.constant(resized)
    for image_format in (imaging.ImageFormat.PNG, imaging.ImageFormat.RAW):
        assert imaging_tf.stored_pixels(lossless, image_format) is lossless


def test_served_pixels_are_the_stored_pixels():
    # The whole serving path (decode, resize, stored format) against the shard's bytes as
    # the pipeline writes them. Where the resize is a level off, the JPEG block around it
    # may quantise differently: not equal everywhere, but far closer than the pixels
    # before storage, which is what serving computed before it ended with the JPEG.
    spec = imaging.ImageSpec(64, 64)
    served_fn = {stored_as: tf.function(lambda d, stored_as=stored_as: imaging_tf.process_image(
        d, (64, 64), stored_as=stored_as, jpeg_quality=spec.jpeg_quality))
        for stored_as in (None, spec.image_format)}
    for name in ["photo.jpg", "photo-progressive.jpg", "o8-be.jpg", "photo.webp", "o6.png"]:
        stored = imaging.process_image(FILES[name], spec).encoded
        trainer_reads = tf.io.decode_jpeg(stored, channels=3, dct_method="INTEGER_ACCURATE")
        diff = {stored_as: np.abs(fn(tf.constant(FILES[name])).numpy().astype(int)
                                  - trainer_reads.numpy().astype(int)).mean()
                for stored_as, fn in served_fn.items()}
        assert diff[spec.image_format] < min(0.5, diff[None] / 4), (name, diff)

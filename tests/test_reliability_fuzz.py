"""Fuzzed and crafted images through the decode path: decode or dead letter, nothing else.

The long run (tens of thousands of cases, per-case timeout and RLIMIT_AS in worker
processes) is `tests/benchmarks/fuzz_decode.py`; this keeps a few hundred hypothesis
examples, every crafted attack, and the regressions fuzzing found, in the suite.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time

import apache_beam as beam
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.contract.imaging import (
    MAX_JPEG_SCANS,
    DecodeError,
    ImageSpec,
    ProcessedImage,
    decode_rgb,
    process_image,
)
from pipelines.preprocessing.sources import SourceFile
from pipelines.preprocessing.transforms import ERRORS_TAG, DecodedImage, DecodeSourceFn, ErrorRow
from tests import fuzz_images

REASONS = {"empty_file", "not_an_image", "bad_header", "too_many_pixels", "too_many_scans",
           "corrupt_data"}
# Small targets and a 4 Mpx limit keep each example fast; the benchmark uses the defaults.
SPEC = ImageSpec(32, 32, max_pixels=4_000_000)
PER_IMAGE_S = 10.0  # generous: a 4 Mpx decode takes ~0.3 s on a loaded 2-core box

mutations = st.lists(
    st.builds(
        fuzz_images.Mutation,
        kind=st.sampled_from(fuzz_images.KINDS),
        where=st.floats(0, 1, exclude_max=True),
        value=st.integers(0, 0xFFFF),
        extra=st.integers(0, 0xFFFF),
    ),
    min_size=1,
    max_size=4,
)


def decode_or_dead_letter(data: bytes, spec: ImageSpec = SPEC) -> str:
    """'decoded' or the dead-letter reason; any other exception fails the test."""
    started = time.monotonic()
    try:
        image = process_image(data, spec)
    except DecodeError as err:
        assert err.reason in REASONS, err
        outcome = err.reason
    else:
        assert isinstance(image, ProcessedImage)
        assert (image.height, image.width) == (spec.height, spec.width)
        assert image.encoded and image.original_height > 0 and image.original_width > 0
        outcome = "decoded"
    assert time.monotonic() - started < PER_IMAGE_S
    return outcome


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.sampled_from(sorted(fuzz_images.seed_images())), edits=mutations)
def test_mutated_real_images_decode_or_become_dead_letters(seed, edits):
    seeds = fuzz_images.seed_images()
    decode_or_dead_letter(fuzz_images.apply(seeds[seed], edits, list(seeds.values())))


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_other_exceptions(data):
    decode_or_dead_letter(data)


@pytest.mark.parametrize("name", sorted(fuzz_images.seed_images()))
def test_every_seed_decodes(name):
    assert decode_or_dead_letter(fuzz_images.seed_images()[name]) == "decoded"


EXPECTED_HOSTILE = {
    "png_40000x40000.png": "too_many_pixels",
    "png_max_dims.png": "too_many_pixels",
    "jpeg_65500x65500.jpg": "too_many_pixels",
    "gif_65535_screen.gif": "too_many_pixels",
    "webp_16383.webp": "too_many_pixels",
    "bmp_huge.bmp": "too_many_pixels",
    "jpeg_progressive_60000x60000.jpg": "too_many_pixels",
    "jpeg_progressive_5000_scans.jpg": "too_many_scans",  # a few KB, seconds to decode
    # Under the pixel limit, but more pixels than the bytes could ever encode.
    "png_10000x9999_tiny.png": "too_many_pixels",
    "png16_10000x9999_tiny.png": "too_many_pixels",
    "bmp_10000x9999.bmp": "too_many_pixels",
    "gif_10000x10000.gif": "too_many_pixels",
    "png_ztxt_bomb.png": "bad_header",  # PIL caps inflated text chunks (MAX_TEXT_CHUNK)
    "png_iccp_bomb.png": "bad_header",
    "tiff_as.jpg": "not_an_image",  # TIFF is not a source format we open
    "psd_magic.png": "not_an_image",
    "empty.png": "empty_file",
    "one_byte.gif": "not_an_image",
}


@pytest.mark.parametrize("name", sorted(fuzz_images.hostile_images()))
def test_crafted_attacks_are_refused_or_decoded_within_bounds(name):
    data = fuzz_images.hostile_images()[name]
    outcome = decode_or_dead_letter(data, ImageSpec(32, 32))  # the default 100 Mpx limit
    assert outcome == EXPECTED_HOSTILE.get(name, "decoded"), name


def _png_with_broken_idat() -> bytes:
    """A valid PNG whose IDAT is damaged but re-sealed with a correct CRC."""
    png = fuzz_images.seed_images()["rgb.png"]
    offset = png.index(b"IDAT") - 4
    length = struct.unpack_from(">I", png, offset)[0]
    body = bytearray(png[offset + 8 : offset + 8 + length])
    body[2 : length // 2] = b"\xff" * (length // 2 - 2)  # garbage after the zlib header
    return png[:offset] + fuzz_images.png_chunk(b"IDAT", bytes(body)) + png[
        offset + 12 + length :]


def test_regression_damaged_png_is_a_dead_letter_not_a_blank_image():
    """Found by fuzzing: PNG's getexif() loads the pixels; its error was swallowed as 'no
    EXIF', and the second load() returned the blank canvas as a decoded image (and on a
    100 Mpx header spent 8 s converting it)."""
    assert decode_or_dead_letter(_png_with_broken_idat()) == "corrupt_data"
    large = fuzz_images.set_dims(_png_with_broken_idat(), 5000, 5000)  # 4 KB may hold 25 Mpx
    started = time.monotonic()
    assert decode_or_dead_letter(large, ImageSpec(32, 32)) == "corrupt_data"
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("fmt, params", [
    ("PNG", {"optimize": True}), ("GIF", {}), ("WEBP", {"lossless": True}),
    ("WEBP", {"quality": 50}), ("BMP", {}), ("JPEG", {"quality": 50}),
])
def test_density_limit_spares_real_flat_images(fmt, params):
    """The pixels-a-byte limits are format maxima: a flat 9 Mpx image, the most
    compressible real input, still decodes."""
    flat = Image.new("RGB", (3000, 3000), (120, 30, 200))
    buffer = io.BytesIO()
    flat.save(buffer, format=fmt, **params)
    assert decode_or_dead_letter(buffer.getvalue(), ImageSpec(32, 32)) == "decoded"


def test_regression_16_bit_png_converts_by_top_byte():
    """The uint16 fast path (5 s -> 0.5 s on 100 Mpx) keeps TF's top-byte mapping."""
    data = fuzz_images.seed_images()["gray16.png"]
    pixels, _, _ = decode_rgb(data)
    expected = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint32) >> 8).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)


def test_decode_fn_turns_every_fuzzed_file_into_exactly_one_output(tmp_path):
    """Through the Beam DoFn: one DecodedImage or one dead-letter row per file."""
    fn = DecodeSourceFn(SPEC, str(tmp_path / "spill"), None)
    fn.setup()
    fn.start_bundle()
    outcomes = []
    for index in range(60):
        name, _, data = fuzz_images.case(11, index)
        path = tmp_path / f"case{index}.{name.rsplit('.', 1)[1]}"
        path.write_bytes(data)
        outputs = list(fn.process(SourceFile(str(path), ("x",))))
        assert len(outputs) == 1, outputs
        out = outputs[0]
        if isinstance(out, beam.pvalue.TaggedOutput):
            assert out.tag == ERRORS_TAG and isinstance(out.value, ErrorRow)
            assert out.value.reason in REASONS, out.value  # never decoder_failure
            outcomes.append(out.value.reason)
        else:
            assert isinstance(out, DecodedImage)
            outcomes.append("decoded")
    fn.finish_bundle()
    assert "decoded" in outcomes and len(set(outcomes)) > 2


def test_fuzz_benchmark_runs_under_memory_and_time_limits():
    """The benchmark harness itself, small: crafted attacks + 150 mutations in worker
    processes capped at 2 GB address space and 20 s a case; exit 0 = nothing escaped."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.fuzz_decode", "--cases", "150", "--seed",
         "5", "--memory_mb", "2048", "--timeout_s", "20"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no crashes, timeouts or memory errors" in result.stdout


def test_scan_limit_is_exact_and_spares_real_progressive_jpegs():
    """Real progressive files hold ~10 scans; the limit counts start-of-scan markers."""
    limit = MAX_JPEG_SCANS
    assert decode_or_dead_letter(fuzz_images.progressive_jpeg(64, 64, limit)) == "decoded"
    assert decode_or_dead_letter(fuzz_images.progressive_jpeg(64, 64, limit + 1)) == (
        "too_many_scans")
    real = fuzz_images.seed_images()["big_progressive.jpg"]
    assert 1 < real.count(b"\xff\xda") <= limit // 5

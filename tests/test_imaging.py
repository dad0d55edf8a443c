"""Decode and resize on real encoded files of every kind users have."""

import numpy as np
import pytest

from pipelines.contract import imaging
from pipelines.contract.imaging import DecodeError, ImageFormat, ImageSpec, ResizeMode
from tests import corpus


@pytest.mark.parametrize("name", sorted(corpus.every_encoding()))
def test_every_encoding_decodes_to_rgb_at_target_size(name):
    data = corpus.every_encoding()[name]
    result = imaging.process_image(data, ImageSpec(32, 24, image_format=ImageFormat.RAW))
    pixels = np.frombuffer(result.encoded, np.uint8).reshape(32, 24, 3)
    assert pixels.std() > 1, "decoded to a flat image"
    assert (result.original_height, result.original_width) in ((48, 64), (32, 48), (30, 40))


def test_exif_orientation_is_applied():
    data = corpus.jpeg_with_orientation(corpus.two_halves(40, 60))
    pixels, source_format, original = imaging.decode_rgb(data)
    assert source_format == "JPEG"
    assert original == (40, 60)
    assert pixels.shape == (40, 60, 3)
    left, right = pixels[:, :25].mean(axis=(0, 1)), pixels[:, 35:].mean(axis=(0, 1))
    assert left[0] > 180 and left[2] < 60, left  # red on the left, as a person sees it
    assert right[2] > 180 and right[0] < 60, right


def test_exif_orientation_survives_draft_decoding():
    upright = corpus.two_halves(400, 600)
    data = corpus.jpeg_with_orientation(upright)
    pixels, _, original = imaging.decode_rgb(data, draft_size=(50, 75))
    assert original == (400, 600)
    assert pixels.shape[0] < pixels.shape[1], "landscape stays landscape"
    assert pixels.shape[0] >= 50 and pixels.shape[1] >= 75


def test_decompression_bomb_refused_before_allocation():
    with pytest.raises(DecodeError) as caught:
        imaging.process_image(corpus.png_bomb(), ImageSpec(64, 64))
    assert caught.value.reason == "too_many_pixels"


@pytest.mark.parametrize("name", sorted(corpus.broken_files()))
def test_broken_files_raise_decode_error_with_reason(name):
    data, reason = corpus.broken_files()[name]
    with pytest.raises(DecodeError) as caught:
        imaging.process_image(data, ImageSpec(64, 64))
    assert caught.value.reason == reason


def test_sixteen_bit_gray_keeps_its_range():
    pixels, _, _ = imaging.decode_rgb(corpus.sixteen_bit_gray())
    assert pixels[:, 0].max() < 5 and pixels[:, -1].min() > 250  # not clipped to white


def test_alpha_is_dropped_not_composited():
    rgba = corpus.two_halves().convert("RGBA")
    rgba.putalpha(0)  # fully transparent: TF's decoders still return the colours
    pixels, _, _ = imaging.decode_rgb(corpus.encode(rgba, "PNG"))
    assert tuple(pixels[0, 0]) == corpus.RED


def test_resize_modes_place_the_picture():
    wide = np.asarray(corpus.two_halves(20, 80, left=corpus.RED, right=corpus.BLUE))
    squashed = imaging.resize(wide, (40, 40), ResizeMode.SQUASH)
    cropped = imaging.resize(wide, (40, 40), ResizeMode.CROP)
    padded = imaging.resize(wide, (40, 40), ResizeMode.PAD)
    assert squashed.shape == cropped.shape == padded.shape == (40, 40, 3)
    assert tuple(squashed[20, 5]) == corpus.RED and tuple(squashed[20, 35]) == corpus.BLUE
    # crop keeps the centre 20x20 of the 40x160 upscale: the seam in the middle
    assert tuple(cropped[20, 2]) == corpus.RED and tuple(cropped[20, 37]) == corpus.BLUE
    # pad: 10-pixel picture band centred, black above and below
    assert padded[:10].max() == 0 and padded[-10:].max() == 0
    assert tuple(padded[20, 2]) == corpus.RED


def test_resize_geometry_crop_and_pad():
    assert imaging.resize_geometry((100, 200), (50, 50), ResizeMode.CROP) == (
        (50, 100), (0, 25, 50, 75))
    assert imaging.resize_geometry((100, 200), (50, 50), ResizeMode.PAD) == (
        (25, 50), (12, 0, 37, 50))


def test_encoding_is_deterministic():
    data = corpus.every_encoding()["baseline.jpg"]
    spec = ImageSpec(32, 32)
    assert imaging.process_image(data, spec).encoded == imaging.process_image(data, spec).encoded


def test_channel_sums_match_stored_pixels():
    data = corpus.every_encoding()["rgb.png"]
    result = imaging.process_image(data, ImageSpec(16, 16, image_format=ImageFormat.RAW))
    pixels = np.frombuffer(result.encoded, np.uint8).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(result.channel_sums, pixels.sum(axis=0))
    np.testing.assert_allclose(result.channel_squared_sums, (pixels**2).sum(axis=0))

"""The fast JPEG path (simplejpeg) against the contract it replaces: PIL's draft decode.

PIL is the reference here, written out in `pil_reference`: same DCT scale, same pixels,
same verdict on damaged files. Real encoded photos, real mutations (tests/fuzz_images.py).
"""

import io
import random

import numpy as np
import pytest
from PIL import Image

from pipelines.contract import imaging
from pipelines.contract.imaging import DecodeError
from tests import corpus, fuzz_images

# Sizes that make every DCT scale happen on the 110x150 photo: 1, 2, 4, 8 and "smaller
# than the target" (scale 1 again, through PIL's own rule).
DRAFTS = (None, (60, 40), (30, 20), (18, 13), (10, 8), (400, 400))


def jpeg_seeds() -> dict[str, bytes]:
    seeds = {k: v for k, v in fuzz_images.seed_images().items() if k.endswith(".jpg")}
    big = fuzz_images._photo(150, 110, top=0, left=0)
    seeds["444.jpg"] = fuzz_images._encode(big, "JPEG", quality=95, subsampling=0)
    seeds["422_odd.jpg"] = fuzz_images._encode(big.crop((0, 0, 107, 149)), "JPEG",
                                               quality=90, subsampling=1)
    for orientation in (3, 6, 8):
        seeds[f"orient{orientation}.jpg"] = corpus.jpeg_with_orientation(big, orientation)
    return seeds


def pil_reference(data: bytes, draft: tuple[int, int] | None) -> np.ndarray | str:
    """What decode_image returned before the fast path: pixels, or the dead-letter reason."""
    try:
        image = imaging.open_header(data)
        if draft is not None:
            transposed = imaging.exif_orientation(image) in (5, 6, 7, 8)
            image.draft("RGB", (draft[0], draft[1]) if transposed else (draft[1], draft[0]))
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise DecodeError("corrupt_data") from err
        orientation = imaging.exif_orientation(image)
        image = image.convert("RGB")
        if orientation != 1:
            image = image.transpose(imaging._ORIENTATION_TRANSPOSE[orientation])
        return np.asarray(image)
    except DecodeError as err:
        return err.reason


def outcome(data: bytes, draft: tuple[int, int] | None) -> np.ndarray | str:
    try:
        return np.asarray(imaging.decode_image(data, draft)[0])
    except DecodeError as err:
        return err.reason


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("name", sorted(jpeg_seeds()))
def test_same_pixels_as_pils_draft_decode(name, draft):
    data = jpeg_seeds()[name]
    expected, got = pil_reference(data, draft), outcome(data, draft)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", sorted(jpeg_seeds()))
def test_fast_path_takes_every_ycbcr_and_grey_jpeg(name):
    data = jpeg_seeds()[name]
    header = imaging.open_header(data)
    fast = imaging._decode_turbo(data, header, (20, 20))
    # CMYK keeps PIL's conversion (the inverted Adobe CMYK PIL writes and reads).
    assert (fast is None) == (name == "cmyk.jpg")
    if fast is not None:
        scale = imaging.draft_scale(header.size, (20, 20))
        assert fast.size == (-(-header.size[0] // scale), -(-header.size[1] // scale))


@pytest.mark.parametrize("size, want, scale", [
    ((500, 375), (224, 224), 1), ((1000, 750), (224, 224), 2), ((4000, 3000), (224, 224), 8),
    ((100, 100), (224, 224), 1), ((1792, 1000), (224, 224), 4)])
def test_draft_scale_is_pils_choice(size, want, scale):
    assert imaging.draft_scale(size, want) == scale
    image = Image.new("RGB", size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    opened = Image.open(buffer)
    opened.draft("RGB", want)
    assert opened.size == (-(-size[0] // scale), -(-size[1] // scale))


def test_damaged_jpegs_keep_pils_verdict():
    """Mutants of every seed: the fast path may refuse more than PIL, never decide
    differently; PIL decodes what it refuses, so outcomes match one for one."""
    seeds = jpeg_seeds()
    rng = random.Random(19)
    differ, decoded = [], 0
    for i in range(600):
        name = sorted(seeds)[i % len(seeds)]
        edits = [fuzz_images.Mutation(rng.choice(fuzz_images.KINDS), rng.random(),
                                      rng.randrange(1 << 16), rng.randrange(1 << 8))
                 for _ in range(rng.randint(1, 3))]
        data = fuzz_images.apply(seeds[name], edits, list(seeds.values()))
        draft = DRAFTS[i % len(DRAFTS)]
        expected, got = pil_reference(data, draft), outcome(data, draft)
        decoded += not isinstance(expected, str)
        if isinstance(expected, str) or isinstance(got, str):
            same = isinstance(got, str) and got == expected
        else:
            same = got.shape == expected.shape and np.array_equal(got, expected)
        if not same:
            differ.append((name, edits))
    assert not differ, differ[:3]
    assert 100 < decoded < 580, "mutants should both decode and fail"


def test_crafted_sparse_jpegs_skip_the_fast_path():
    """A file simplejpeg refuses is decoded again by PIL; the crafted large canvases must not
    pay twice, so they go to PIL directly (their decode cost is what the fuzz bounds hold)."""
    hostile = {name: data for name, data in fuzz_images.hostile_images().items()
               if name.endswith(".jpg")}
    opened = 0
    for name, data in hostile.items():
        try:
            header = imaging.open_header(data)
        except DecodeError:
            continue
        opened += 1
        if header.size[0] * header.size[1] > 4_000_000:
            assert imaging._decode_turbo(data, header, (32, 32)) is None, name
    assert opened

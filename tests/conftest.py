"""Fixtures shared by several test modules."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support.demo_data import make_demo_images

ROTATIONS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
             8: Image.Transpose.ROTATE_270}  # stored so that EXIF `orientation` makes it upright


@dataclasses.dataclass(frozen=True)
class PhotoPrep:
    raw: Path  # class folders of source files
    output: Path  # the preprocess output (manifest.json, shards, transform_output)


@pytest.fixture(scope="session")
def photo_prep(tmp_path_factory) -> PhotoPrep:
    """Crops of 4 real photos (45 a class) through the project's own preprocess, at 64 px.

    Sources are 150x200 JPEGs (decoded at DCT scale 2 for 64 px), and per class a few
    EXIF-rotated JPEGs, PNGs and WebPs, so raw-bytes serving meets every decode path.
    Runs in a subprocess: a process that ran tf.Transform may crash at exit.
    """
    raw = tmp_path_factory.mktemp("photos")
    make_demo_images(str(raw), per_class=40, size=(150, 200), seed=1)
    for folder in sorted(p for p in raw.iterdir() if p.is_dir()):
        sources = sorted(folder.glob("*.jpg"))
        for index, orientation in enumerate(ROTATIONS):
            upright = Image.open(sources[index])
            exif = Image.Exif()
            exif[0x0112] = orientation
            upright.transpose(ROTATIONS[orientation]).save(
                folder / f"rotated{orientation}.jpg", quality=90, exif=exif)
        Image.open(sources[3]).save(folder / "copy.png")
        Image.open(sources[4]).save(folder / "copy.webp", quality=90)
    output = tmp_path_factory.mktemp("prep") / "out"
    subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", "--input", str(raw), "--output",
         str(output), "--image_size", "64", "--num_shards", "2", "--no_progress"],
        check=True, capture_output=True,
    )
    return PhotoPrep(raw, output)

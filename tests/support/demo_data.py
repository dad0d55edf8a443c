"""A small, learnable image set made from real photos that ship inside installed wheels.

Each class is one photo from scikit-image's `skimage.data` (files bundled in the
wheel, so no download and no pooch); each example is a random crop of it
(40-90 % of the largest crop with the target aspect, random position, random
horizontal flip, +-10 % brightness) resized to the target size and saved as a
JPEG. Crops of one photo share colours and textures, so a small CNN separates
the classes within a few epochs, yet no two examples are the same image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# label -> skimage.data loader name; all are RGB photos bundled in the wheel.
SOURCES: dict[str, str] = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
}
JPEG_QUALITY = 90
CROP_SCALE = (0.4, 0.9)
BRIGHTNESS = (0.9, 1.1)


def make_demo_images(
    out_dir: str,
    per_class: int = 60,
    size: tuple[int, int] = (375, 500),
    seed: int = 0,
) -> dict[str, int]:
    """Write `out_dir/<label>/<label>_NNNN.jpg`; returns the number written per label.

    `size` is (height, width). The same seed gives byte-identical files.
    """
    counts = {}
    for class_index, (label, loader) in enumerate(SOURCES.items()):
        # One stream per class, so a class's images do not depend on the others.
        rng = np.random.default_rng([seed, class_index])
        folder = Path(out_dir) / label
        folder.mkdir(parents=True, exist_ok=True)
        photo = Image.fromarray(_load_photo(loader))
        for index in range(per_class):
            crop = random_crop(photo, size, rng)
            crop.save(folder / f"{label}_{index:04d}.jpg", format="JPEG", quality=JPEG_QUALITY)
        counts[label] = per_class
    return counts


def random_crop(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One augmented example of `photo`, `size` = (height, width)."""
    height, width = size
    box = _crop_box(photo.width, photo.height, width / height, rng)
    # `box` lets PIL crop and resize in one pass, with subpixel precision.
    crop = photo.resize((width, height), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _scale_brightness(crop, float(rng.uniform(*BRIGHTNESS)))


def _crop_box(
    source_width: int, source_height: int, aspect: float, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    # Largest box with the target aspect that fits, so the resize does not distort.
    full_height = min(source_height, source_width / aspect)
    scale = float(rng.uniform(*CROP_SCALE))
    crop_height, crop_width = full_height * scale, full_height * scale * aspect
    left = float(rng.uniform(0, source_width - crop_width))
    top = float(rng.uniform(0, source_height - crop_height))
    return left, top, left + crop_width, top + crop_height


def _scale_brightness(image: Image.Image, factor: float) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) * factor
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _load_photo(loader: str) -> np.ndarray:
    import skimage.data  # deferred: only the demo and its tests need scikit-image

    load: Callable[[], np.ndarray] = getattr(skimage.data, loader)
    photo = load()
    if photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"skimage.data.{loader}() is not an RGB photo: {photo.shape}")
    return photo

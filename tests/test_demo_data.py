"""The demo image set: layout, decodable JPEGs, determinism."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.demo_data import SOURCES, make_demo_images

SIZE = (60, 80)  # (height, width); small keeps the tests fast


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_counts_and_layout(tmp_path: Path) -> None:
    counts = make_demo_images(str(tmp_path), per_class=5, size=SIZE)

    assert counts == {label: 5 for label in SOURCES}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SOURCES)
    for label in SOURCES:
        assert len(list((tmp_path / label).glob("*.jpg"))) == 5


@pytest.mark.parametrize("size", [SIZE, SIZE[::-1]])  # landscape and portrait
def test_files_decode_to_rgb_of_the_requested_size(tmp_path: Path, size: tuple[int, int]) -> None:
    make_demo_images(str(tmp_path), per_class=3, size=size)

    for path in tmp_path.rglob("*.jpg"):
        with Image.open(path) as image:
            image.load()
            assert (image.format, image.mode) == ("JPEG", "RGB")
            assert (image.height, image.width) == size


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    make_demo_images(str(first), per_class=4, size=SIZE, seed=3)
    make_demo_images(str(again), per_class=4, size=SIZE, seed=3)
    make_demo_images(str(other), per_class=4, size=SIZE, seed=4)

    assert _files(first) == _files(again)
    assert _files(first).keys() == _files(other).keys()
    assert _files(first) != _files(other)


def test_examples_of_a_class_differ(tmp_path: Path) -> None:
    make_demo_images(str(tmp_path), per_class=6, size=SIZE)

    cats = list(_files(tmp_path / "cat").values())
    assert len(set(cats)) == len(cats)


def _colour_histogram(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")) // 64  # 4 levels per channel
    bins = pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2]
    return np.bincount(bins.ravel(), minlength=64) / bins.size


def test_classes_are_learnable(tmp_path: Path) -> None:
    # A cheap stand-in for "a CNN can learn it": nearest colour-histogram centroid,
    # fitted on half the crops of each class, labels the held-out half.
    make_demo_images(str(tmp_path), per_class=20, size=SIZE)
    features = {
        label: [_colour_histogram(p) for p in sorted((tmp_path / label).glob("*.jpg"))]
        for label in SOURCES
    }
    centroids = {label: np.mean(rows[:10], axis=0) for label, rows in features.items()}

    def nearest(row: np.ndarray) -> str:
        return min(centroids, key=lambda label: float(np.linalg.norm(row - centroids[label])))

    held_out = [(label, row) for label, rows in features.items() for row in rows[10:]]
    accuracy = np.mean([nearest(row) == label for label, row in held_out])
    assert accuracy >= 0.9


def test_default_set_is_fast_enough(tmp_path: Path) -> None:
    start = time.perf_counter()
    counts = make_demo_images(str(tmp_path))  # 60 per class at 375x500
    elapsed = time.perf_counter() - start

    assert sum(counts.values()) == 60 * len(SOURCES)
    assert elapsed < 10

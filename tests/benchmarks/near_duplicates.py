"""Near-duplicate detection on a planted set: precision, recall and cost per image.

Distinct images are non-overlapping tiles of the photos that ship with scikit-image; a
third of them get copies re-encoded, resized, cropped 3 % a side and brightness-shifted,
some filed under another class. The preprocess job runs over the folder; its
stats/near_duplicates.jsonl is scored against the planted pairs (every pair within one
original's family). Cost: the hash against the whole decode (process_image) of the same
images, and the pairing of 100,000 random hashes in memory.

    .venv/bin/python -m tests.benchmarks.near_duplicates [--tiles 6]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from pipelines import preprocess
from pipelines.contract.imaging import ImageSpec, perceptual_hash, process_image
from pipelines.preprocessing import near_duplicates as nd

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera", "coins", "moon", "page", "brick",
          "grass", "gravel", "horse", "clock", "cat")


def photos() -> dict[str, Image.Image]:
    import skimage.data

    found = {}
    for name in PHOTOS:
        try:
            pixels = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a loader that needs a download: skip it
            continue
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        found[name] = Image.fromarray(pixels[..., :3].astype(np.uint8))
    return found


def edits(image: Image.Image) -> dict[str, Image.Image]:
    width, height = image.size
    dx, dy = max(1, int(width * 0.03)), max(1, int(height * 0.03))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=60)
    return {"reencoded": Image.open(io.BytesIO(buffer.getvalue())),
            "resized": image.resize((int(width * 0.6), int(height * 0.6))),
            "cropped": image.crop((dx, dy, width - dx, height - dy)),
            "brighter": ImageEnhance.Brightness(image).enhance(1.15)}


def plant(root: Path, tiles: int, seed: int = 0) -> tuple[set, int]:
    """Writes the set; returns (planted pairs of sha256, number of files)."""
    rng = random.Random(seed)
    families: list[list[str]] = []
    files = 0
    for name, photo in photos().items():
        width, height = photo.size
        side = min(width, height) // 2
        for row in range(2):
            for column in range(tiles // 2):
                if (column + 1) * side > width:
                    continue
                tile = photo.crop((column * side, row * side, (column + 1) * side,
                                   (row + 1) * side)).convert("RGB")
                label = name
                family = [_save(root / label / f"{row}_{column}.jpg", tile)]
                files += 1
                if rng.random() < 1 / 3:
                    for edit, copy in edits(tile).items():
                        other = label if rng.random() < 0.8 else rng.choice(PHOTOS)
                        family.append(_save(root / other / f"{row}_{column}_{edit}.jpg",
                                            copy.convert("RGB")))
                        files += 1
                families.append(family)
    planted = {tuple(sorted(pair)) for family in families for pair in combinations(family, 2)}
    return planted, files


def _save(path: Path, image: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=6, help="tiles per photo (even)")
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        raw, out = Path(scratch) / "raw", Path(scratch) / "out"
        planted, files = plant(raw, args.tiles)
        started = time.perf_counter()
        code = preprocess.run(["--input", str(raw), "--output", str(out), "--no_progress",
                               "--image_size", str(args.image_size)])
        elapsed = time.perf_counter() - started
        assert code == 0, code
        found = {(row["sha256_a"], row["sha256_b"])
                 for row in map(json.loads, (out / nd.PATH).read_text().splitlines())}
        sample = [path.read_bytes() for path in sorted(raw.rglob("*.jpg"))[:100]]
    true = len(found & planted)
    spec = ImageSpec(args.image_size, args.image_size)
    decoded = [process_image(data, spec) for data in sample]
    begun = time.perf_counter()
    for data in sample:
        process_image(data, spec)
    decode_s = (time.perf_counter() - begun) / len(sample)
    stored = [Image.open(io.BytesIO(image.encoded)) for image in decoded]
    begun = time.perf_counter()
    for image in stored:
        perceptual_hash(image)
    hash_s = (time.perf_counter() - begun) / len(stored)
    rng = random.Random(1)
    members = [nd.Member(rng.getrandbits(64), f"{i:06d}", "train", ()) for i in range(100_000)]
    begun = time.perf_counter()
    nd.find_pairs(members)
    pairing_s = time.perf_counter() - begun
    print(json.dumps({
        "files": files, "planted_pairs": len(planted), "found_pairs": len(found),
        "precision": round(true / max(len(found), 1), 3),
        "recall": round(true / max(len(planted), 1), 3),
        "threshold": nd.DEFAULT_THRESHOLD, "preprocess_s": round(elapsed, 1),
        "hash_ms_per_image": round(hash_s * 1e3, 3),
        "decode_ms_per_image": round(decode_s * 1e3, 3),
        "hash_share_of_decode": round(hash_s / decode_s, 3),
        "pairing_100k_random_hashes_s": round(pairing_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

"""Small real image files made in the test: every encoding users have, and every way files break.

Each builder returns encoded bytes; `write_corpus` lays them out as class folders and
returns what the pipeline must make of them.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE, GREEN, WHITE = (220, 20, 20), (20, 20, 220), (20, 200, 20), (250, 250, 250)


def two_halves(height: int = 40, width: int = 60, left=RED, right=BLUE) -> Image.Image:
    """Upright test picture: left half one colour, right half another."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def noise(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth noise compresses like a photo and keeps JPEG round trips close.
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def jpeg_with_orientation(upright: Image.Image, orientation: int = 6) -> bytes:
    """A JPEG whose stored pixels need EXIF `orientation` to look like `upright`."""
    inverse = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,  # stored rotated CCW; viewers rotate CW
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(upright.transpose(inverse), "JPEG", quality=95, exif=exif)


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A ~100-byte PNG declaring width x height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(
        b"IEND", b""
    )


def sixteen_bit_gray(height: int = 32, width: int = 48) -> bytes:
    ramp = np.tile(np.linspace(0, 65535, width, dtype=np.uint16), (height, 1))
    return encode(Image.fromarray(ramp, mode="I;16"), "PNG")


def every_encoding(seed: int = 0) -> dict[str, bytes]:
    """name -> bytes for each encoding the pipeline must decode."""
    base = noise(48, 64, seed)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    frames = [noise(30, 40, seed + 1), noise(30, 40, seed + 2)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "baseline.jpg": encode(base, "JPEG", quality=90),
        "progressive.jpg": encode(noise(48, 64, seed + 3), "JPEG", quality=90, progressive=True),
        "gray.jpg": encode(noise(48, 64, seed + 4).convert("L"), "JPEG", quality=90),
        "cmyk.jpg": encode(noise(48, 64, seed + 5).convert("CMYK"), "JPEG", quality=90),
        "rgb.png": encode(noise(48, 64, seed + 6), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(noise(48, 64, seed + 7).convert("P"), "PNG"),
        "gray16.png": sixteen_bit_gray(),
        "anim.gif": gif.getvalue(),
        "plain.bmp": encode(noise(48, 64, seed + 8), "BMP"),
        "photo.webp": encode(noise(48, 64, seed + 9), "WEBP", quality=90),
    }


def broken_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected dead-letter reason)."""
    whole = encode(noise(64, 64, 42), "JPEG", quality=90)
    return {
        "empty.jpg": (b"", "empty_file"),
        "truncated.jpg": (whole[: len(whole) // 2], "corrupt_data"),
        "random.jpg": (np.random.default_rng(1).bytes(3000), "not_an_image"),
        "page.png": (b"<!doctype html><html><body>404</body></html>", "not_an_image"),
        "bomb.png": (png_bomb(), "too_many_pixels"),
    }


# write_corpus's files are about a fifth broken on purpose, far over the default
# --max_error_rate of a real corpus: runs over it raise the budget.
ERROR_BUDGET_ARGS = ["--max_error_rate", "0.5"]


def write_corpus(root: Path) -> dict:
    """Class folders with every encoding, an EXIF-rotated image, a duplicate, a label
    conflict, broken files, a text file and a dot-file. Returns the expected accounting."""
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    for index, (name, data) in enumerate(sorted(every_encoding().items())):
        (cat if index % 2 else dog).joinpath(name).write_bytes(data)
    for index in range(8):
        folder = cat if index % 2 else dog
        folder.joinpath(f"photo{index}.jpg").write_bytes(
            encode(noise(60, 80, 100 + index), "JPEG", quality=90)
        )
    cat.joinpath("rotated.jpg").write_bytes(jpeg_with_orientation(two_halves()))
    dog.joinpath("photo0-copy.jpg").write_bytes(dog.joinpath("photo0.jpg").read_bytes())
    cat.joinpath("photo0-in-wrong-folder.jpg").write_bytes(dog.joinpath("photo0.jpg").read_bytes())
    for name, (data, _) in broken_files().items():
        cat.joinpath(name).write_bytes(data)
    cat.joinpath("notes.txt").write_text("not an image")
    root.joinpath(".DS_Store").write_bytes(b"\x00\x01")
    encodings = len(every_encoding())
    unique_images = encodings + 8 + 1
    return {
        "files_seen": encodings + 8 + 1 + 2 + len(broken_files()) + 1,
        "images_written": unique_images,
        "duplicates": 2,
        "label_conflicts": 1,
        "errors": len(broken_files()),
        "skipped": 1,
        "hidden_ignored": 1,
    }

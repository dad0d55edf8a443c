"""Hostile image bytes for fuzzing the decode path: real seeds, crafted attacks, mutations.

Shared by the hypothesis test (`tests/test_reliability_fuzz.py`) and the long benchmark
(`tests/benchmarks/fuzz_decode.py`), so a case the benchmark reports can be replayed in
the suite. A mutation is plain data (`Mutation`), so hypothesis can draw and shrink it and
the benchmark can draw it from a seeded `random.Random`: the same (seed, case index)
always gives the same bytes.

Seeds are small encodings of a real photo (scikit-image's bundled `chelsea`), in every
container the pipeline accepts. Mutations that only flip bytes mostly die at a checksum
or a magic number, so some are format-aware: they rewrite declared sizes (JPEG SOF, PNG
IHDR, GIF screen and frame, BMP, WebP VP8/VP8L/VP8X) and re-seal PNG chunk CRCs, which
lets the damage reach the decoders instead of the header parsers.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import random
import struct
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

# Values that break size arithmetic: zero, one, sign and width edges, the largest sizes
# each format can declare, and sizes just under / over the pipeline's 100 Mpx limit.
INTERESTING_INTS = (0, 1, 2, 7, 8, 255, 256, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFF,
                    10_000, 16_383, 65_500, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0xD8, 0xD9, 0xDA, 0xC0, 0xC2)
KINDS = ("flip", "byte", "int16", "int32", "dims", "truncate", "insert", "repeat",
         "delete", "splice", "png_chunk", "exif")


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One edit. `where` in [0, 1) picks the position; `value` and `extra` parametrise it."""

    kind: str
    where: float
    value: int = 0
    extra: int = 0


def _photo(height: int, width: int, top: int = 40, left: int = 120) -> Image.Image:
    import skimage.data  # dev dependency; the photo ships inside the wheel

    pixels = skimage.data.chelsea()[top : top + 4 * height : 4, left : left + 4 * width : 4]
    return Image.fromarray(np.ascontiguousarray(pixels))


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _exif(orientation: int = 6, comment_bytes: int = 0) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "fuzz-camera"  # Make
    if comment_bytes:
        exif[0x010E] = "x" * comment_bytes  # ImageDescription: a large EXIF block
    return exif


@functools.cache
def seed_images() -> dict[str, bytes]:
    """name -> bytes of a real photo in each encoding and variant the pipeline accepts."""
    photo = _photo(36, 48)
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    frames = [_photo(24, 32, top=0), _photo(24, 32, top=60)]
    gif, webp_anim = io.BytesIO(), io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(webp_anim, format="WEBP", save_all=True, append_images=frames[1:])
    gray16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "baseline.jpg": _encode(photo, "JPEG", quality=85),
        "progressive.jpg": _encode(photo, "JPEG", quality=85, progressive=True),
        "exif.jpg": _encode(photo, "JPEG", quality=85, exif=_exif(6, 2000)),
        "gray.jpg": _encode(photo.convert("L"), "JPEG", quality=85),
        "cmyk.jpg": _encode(photo.convert("CMYK"), "JPEG", quality=85),
        "big_progressive.jpg": _encode(_photo(150, 110, top=0, left=0), "JPEG", quality=80,
                                       progressive=True),
        "rgb.png": _encode(photo, "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "palette.png": _encode(photo.convert("P"), "PNG"),
        "optimized.png": _encode(photo, "PNG", optimize=True),
        "gray16.png": _encode(Image.fromarray(gray16, mode="I;16"), "PNG"),
        "exif.png": _encode(photo, "PNG", exif=_exif(8, 500)),
        "anim.gif": gif.getvalue(),
        "plain.bmp": _encode(photo, "BMP"),
        "lossy.webp": _encode(photo, "WEBP", quality=80),
        "lossless.webp": _encode(photo, "WEBP", lossless=True),
        "alpha.webp": _encode(rgba, "WEBP", quality=80, exif=_exif(3)),
        "anim.webp": webp_anim.getvalue(),
    }


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, color: int, idat: bytes,
         extra: Sequence[bytes] = (), interlace: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + b"".join(extra)
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def _jpeg_app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def progressive_jpeg(width: int, height: int, scans: int) -> bytes:
    """A gray progressive JPEG (SOF2) of `scans` DC scans, each holding one byte (the first
    8 blocks): decoders accept it with a warning, and walk the whole canvas on every scan.

    Handwritten, ~11 bytes a scan: a 5000-scan file is built in microseconds.
    """
    dqt = b"\xff\xdb" + struct.pack(">HB", 67, 0) + b"\x01" * 64
    sof2 = b"\xff\xc2" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    # One DC Huffman table with a single 1-bit code (0) for category 0: difference 0.
    dht = b"\xff\xc4" + struct.pack(">HB", 20, 0x00) + bytes([1] + [0] * 15) + b"\x00"
    # Component 1, tables 0/0, spectral 0..0 (DC), successive approximation 0/0; data 0x00.
    sos = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 0, 0, 0x00) + b"\x00"
    return b"\xff\xd8" + dqt + sof2 + dht + sos * scans + b"\xff\xd9"


@functools.cache
def hostile_images() -> dict[str, bytes]:
    """name -> crafted attacks on memory and time; each must become a dead letter or decode
    within the per-image bounds (see `tests/benchmarks/fuzz_decode.py`)."""
    small_jpeg = seed_images()["baseline.jpg"]
    tiff_loop = (b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08"  # IFD0 at 8 ...
                 + struct.pack(">H", 1) + struct.pack(">HHII", 0x0112, 3, 1, 6 << 16)
                 + struct.pack(">I", 8))  # ... whose next-IFD pointer is itself
    huge_count = (b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 2)
                  + struct.pack(">HHII", 0x0112, 3, 1, 6 << 16)
                  + struct.pack(">HHII", 0x010E, 2, 0xFFFFFFF0, 8) + b"\x00" * 4)
    row = b"\x00" + b"\x80" * 3 * 64
    return {
        # Declared sizes over the limit: refused from the header, nothing allocated.
        "png_40000x40000.png": _png(40000, 40000, 8, 2, zlib.compress(b"\x00" * 64)),
        "png_max_dims.png": _png(0x7FFFFFFF, 0x7FFFFFFF, 8, 2, zlib.compress(b"")),
        "jpeg_65500x65500.jpg": set_dims(small_jpeg, 65500, 65500),
        "gif_65535_screen.gif": set_dims(seed_images()["anim.gif"], 65535, 65535),
        "webp_16383.webp": set_dims(seed_images()["lossless.webp"], 16383, 16383),
        "bmp_huge.bmp": set_dims(seed_images()["plain.bmp"], 0x7FFFFFFF, 0x7FFFFFFF),
        # libjpeg allocates a progressive JPEG's coefficients for the whole canvas
        # (7 GB here) even when it decodes at 1/8 scale.
        "jpeg_progressive_60000x60000.jpg": progressive_jpeg(60000, 60000, scans=10),
        # Every scan walks every block, data or not: 5000 scans of 2000x2000, 55 KB.
        "jpeg_progressive_5000_scans.jpg": progressive_jpeg(2000, 2000, scans=5000),
        # Just under the limit: allowed by the header, must fail fast on missing data.
        "png_10000x9999_tiny.png": _png(10000, 9999, 8, 2, zlib.compress(row)),
        "png16_10000x9999_tiny.png": _png(10000, 9999, 16, 6, zlib.compress(b"\x00" * 80)),
        "jpeg_10000x10000_tiny.jpg": set_dims(small_jpeg, 10000, 10000),
        # Both JPEG limits at once (pixels, scans): the costliest progressive file allowed.
        "jpeg_progressive_10000x10000_100_scans.jpg": progressive_jpeg(10000, 10000, 100),
        "gif_10000x10000.gif": set_dims(seed_images()["anim.gif"], 10000, 10000),
        "bmp_10000x9999.bmp": set_dims(seed_images()["plain.bmp"], 10000, 9999),
        # A zlib bomb in IDAT: 1 KB that inflates far past what the header declares.
        "png_idat_bomb.png": _png(64, 64, 8, 2, zlib.compress(b"\x00" * 50_000_000, 9)),
        # Text and ICC chunks that inflate to 50 MB: PIL caps them (MAX_TEXT_CHUNK).
        "png_ztxt_bomb.png": _png(8, 8, 8, 2, zlib.compress(row[: 1 + 24] * 8), extra=[
            png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))]),
        "png_iccp_bomb.png": _png(8, 8, 8, 2, zlib.compress(row[: 1 + 24] * 8), extra=[
            png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))]),
        "png_adam7.png": _png(8, 8, 8, 2, zlib.compress(b"\x00" * 300), interlace=1),
        # Huge and hostile EXIF blocks.
        "png_exif_8mb.png": _with_png_chunk(seed_images()["rgb.png"], png_chunk(
            b"eXIf", b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00" * 8_000_000)),
        "jpeg_exif_loop.jpg": small_jpeg[:2] + _jpeg_app1(tiff_loop) + small_jpeg[2:],
        "jpeg_exif_huge_count.jpg": small_jpeg[:2] + _jpeg_app1(huge_count) + small_jpeg[2:],
        "jpeg_many_app1.jpg": small_jpeg[:2] + _jpeg_app1(b"Exif\x00\x00" + b"\x00" * 65000)
        * 200 + small_jpeg[2:],
        # Containers we never asked for, named as images.
        "tiff_as.jpg": _encode(_photo(8, 8), "TIFF"),
        "psd_magic.png": b"8BPS\x00\x01" + b"\x00" * 64,
        "empty.png": b"",
        "one_byte.gif": b"G",
    }


def _with_png_chunk(png: bytes, chunk: bytes) -> bytes:
    """`chunk` inserted right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + chunk + png[33:]


def _clamp(value: int, bits: int) -> int:
    return value & ((1 << bits) - 1)


def set_dims(data: bytes, width: int, height: int) -> bytes:
    """`data` with its declared width/height rewritten (format sniffed); unknown: unchanged."""
    out = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 33:
        struct.pack_into(">II", out, 16, _clamp(width, 32), _clamp(height, 32))
        struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])) & 0xFFFFFFFF)
    elif data[:2] == b"\xff\xd8":
        for offset in _jpeg_sof_offsets(data):
            struct.pack_into(">HH", out, offset + 5, _clamp(height, 16), _clamp(width, 16))
    elif data[:4] == b"GIF8" and len(data) >= 10:
        struct.pack_into("<HH", out, 6, _clamp(width, 16), _clamp(height, 16))
        first_frame = data.find(b"\x2c", 13)
        if first_frame > 0 and first_frame + 9 <= len(data):
            struct.pack_into("<HH", out, first_frame + 5, _clamp(width, 16), _clamp(height, 16))
    elif data[:2] == b"BM" and len(data) >= 26:
        struct.pack_into("<II", out, 18, _clamp(width, 32), _clamp(height, 32))
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _set_webp_dims(data, out, width, height)
    return bytes(out)


def _jpeg_sof_offsets(data: bytes) -> list[int]:
    """Offsets of SOFn markers (baseline, progressive, ...), not DHT/JPG/DAC."""
    found, start = [], 0
    while (offset := data.find(b"\xff", start)) >= 0 and offset + 9 <= len(data):
        marker = data[offset + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            found.append(offset)
        start = offset + 1
    return found


def _set_webp_dims(data: bytes, out: bytearray, width: int, height: int) -> None:
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:
        out[24:27] = _clamp(width - 1, 24).to_bytes(3, "little")
        out[27:30] = _clamp(height - 1, 24).to_bytes(3, "little")
    elif kind == b"VP8L" and len(data) >= 25:
        packed = int.from_bytes(data[21:25], "little")
        packed = (packed & ~((1 << 28) - 1)) | _clamp(width - 1, 14) | (
            _clamp(height - 1, 14) << 14)
        out[21:25] = packed.to_bytes(4, "little")
    elif kind == b"VP8 " and len(data) >= 30:
        struct.pack_into("<HH", out, 26, _clamp(width, 14), _clamp(height, 14))


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, data length) of each well-formed PNG chunk."""
    chunks, offset = [], 8
    while offset + 12 <= len(data):
        length = struct.unpack_from(">I", data, offset)[0]
        if offset + 12 + length > len(data):
            break
        chunks.append((offset, length))
        offset += 12 + length
    return chunks


def apply(data: bytes, mutations: Sequence[Mutation], seeds: Sequence[bytes] = ()) -> bytes:
    """`data` after each mutation in turn; never raises, never grows past ~4x + 1 MB."""
    for mutation in mutations:
        data = _MUTATORS[mutation.kind](data, mutation, seeds)
    return data


def _position(data: bytes, where: float) -> int:
    return min(int(where * len(data)), max(len(data) - 1, 0))


def _flip(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[_position(data, m.where)] ^= 1 << (m.value % 8)
    return bytes(out)


def _byte(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[_position(data, m.where)] = INTERESTING_BYTES[m.value % len(INTERESTING_BYTES)]
    return bytes(out)


def _int(width: int) -> Callable[[bytes, Mutation, Sequence[bytes]], bytes]:
    def mutate(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
        at = _position(data, m.where)
        if at + width > len(data):
            return data
        value = _clamp(INTERESTING_INTS[m.value % len(INTERESTING_INTS)], 8 * width)
        order = "big" if m.extra % 2 else "little"
        return data[:at] + value.to_bytes(width, order) + data[at + width :]

    return mutate


def _dims(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    width = INTERESTING_INTS[m.value % len(INTERESTING_INTS)]
    height = INTERESTING_INTS[m.extra % len(INTERESTING_INTS)]
    return set_dims(data, width, height)


def _truncate(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    return data[: _position(data, m.where)]


def _insert(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    at = _position(data, m.where)
    filler = random.Random(m.value).randbytes(1 + m.extra % 64)
    return data[:at] + filler + data[at:]


def _repeat(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    at = _position(data, m.where)
    piece = data[at : at + 1 + m.extra % 256]
    copies = 1 + m.value % 64
    return data[:at] + piece * copies + data[at:]


def _delete(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    at = _position(data, m.where)
    return data[:at] + data[at + 1 + m.extra % 64 :]


def _splice(data: bytes, m: Mutation, seeds: Sequence[bytes]) -> bytes:
    if not seeds:
        return data
    other = seeds[m.value % len(seeds)]
    cut = _position(data, m.where)
    return data[:cut] + other[_position(other, (m.extra % 1000) / 1000) :]


def _png_chunk(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    """Flip a byte inside one PNG chunk's data and re-seal its CRC (reaches the decoder)."""
    chunks = [(o, n) for o, n in _png_chunks(data) if n]
    if data[:8] != b"\x89PNG\r\n\x1a\n" or not chunks:
        return _flip(data, m, ())
    offset, length = chunks[m.extra % len(chunks)]
    out = bytearray(data)
    out[offset + 8 + int(m.where * length)] ^= 1 + m.value % 255
    crc = zlib.crc32(bytes(out[offset + 4 : offset + 8 + length])) & 0xFFFFFFFF
    struct.pack_into(">I", out, offset + 8 + length, crc)
    return bytes(out)


def _exif_block(data: bytes, m: Mutation, _: Sequence[bytes]) -> bytes:
    """A mutated EXIF block of up to ~60 KB put where the format keeps EXIF."""
    block = bytearray(_exif(1 + m.value % 8, m.extra % 60_000).tobytes())
    rng = random.Random(m.value * 7919 + m.extra)
    for _ in range(1 + m.value % 6):
        block[rng.randrange(len(block))] = rng.randrange(256)
    if data[:2] == b"\xff\xd8":
        return data[:2] + _jpeg_app1(b"Exif\x00\x00" + bytes(block)[:65000]) + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _with_png_chunk(data, png_chunk(b"eXIf", bytes(block)))
    return data


_MUTATORS: dict[str, Callable[[bytes, Mutation, Sequence[bytes]], bytes]] = {
    "flip": _flip, "byte": _byte, "int16": _int(2), "int32": _int(4), "dims": _dims,
    "truncate": _truncate, "insert": _insert, "repeat": _repeat, "delete": _delete,
    "splice": _splice, "png_chunk": _png_chunk, "exif": _exif_block,
}
assert set(_MUTATORS) == set(KINDS)


def random_mutations(rng: random.Random) -> list[Mutation]:
    """1-4 stacked mutations, drawn from `rng` (the benchmark's generator)."""
    return [
        Mutation(rng.choice(KINDS), rng.random(), rng.randrange(1 << 16), rng.randrange(1 << 16))
        for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))
    ]


def case(master_seed: int, index: int) -> tuple[str, list[Mutation], bytes]:
    """Case `index` of a run seeded `master_seed`: (seed name, mutations, bytes)."""
    rng = random.Random(f"{master_seed}:{index}")
    seeds = seed_images()
    name = rng.choice(sorted(seeds))
    mutations = random_mutations(rng)
    return name, mutations, apply(seeds[name], mutations, list(seeds.values()))

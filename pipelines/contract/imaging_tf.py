"""The serving graph's decode and resize: `pipelines/contract/imaging.py` in TensorFlow ops.

A SavedModel cannot call PIL, so the steps `imaging.process_image` takes are
written again here with TF ops, one for one, and `tests/test_imaging_tf.py`
holds the two together on real encoded files of every format and orientation:

1. Header check: the declared size (JPEG SOF, PNG IHDR, GIF screen, BMP DIB,
   WebP VP8/VP8L/VP8X) must not exceed `max_pixels`, nor the pixels the format can
   pack into the file's bytes (`imaging.MAX_PIXELS_PER_BYTE`), and a JPEG must not
   hold more than `imaging.MAX_JPEG_SCANS` scans. Fails before decoding: in a graph,
   ops run in the order their inputs allow, not in program order, so the decoders read
   the file only through an identity that waits for every check.
2. JPEG decodes at a reduced DCT scale exactly as PIL's `draft` picks it: the
   largest of 1, 2, 4, 8 that keeps both sides >= the target, sides compared
   after accounting for the EXIF orientation.
3. EXIF orientation is parsed in-graph (tag 0x0112 of IFD0, both byte orders)
   from JPEG APP1, PNG eXIf and WebP EXIF, and applied.
4. 8-bit RGB: alpha dropped, gray replicated, 16-bit PNG by its top byte
   (TF's libpng strip_16 and `imaging._to_rgb` agree), GIF first frame,
   CMYK/YCCK JPEG via libjpeg.
5. Antialiased bilinear resize (`tf.image.resize(antialias=True)` is PIL's
   BILINEAR with a support widened by the scale), in PIL's two passes (rows, then
   columns) each rounded to uint8 like PIL, with the crop/pad geometry of
   `imaging.resize_geometry`.
6. `stored_pixels`: what the trainer decodes once the pipeline has stored those pixels.
   For JPEG this is TensorFlow's encoder at the pipeline's quality and chroma
   subsampling, which writes what PIL writes, then the trainer's decode. The serving
   signature ends with it, so a model is served the pixels it was trained and
   evaluated on, and a stored-record metric is what serving delivers.

WebP: TF 2.21 has `tf.io.decode_webp` and `decode_image` recognises WebP, but
only with `channels` equal to the file's own (3 or 4); we decode with
`channels=0` and drop alpha ourselves. Animated WebP: first frame.

Known differences from PIL (documented, none met by files the tests make):
orientation given only in XMP (PIL reads `tiff:Orientation` there too), 1- and
4-bit or RLE BMPs (TF's BMP decoder refuses them; 8-bit palette BMPs are looked up
here), GIF frames with a transparent colour (TF leaves those pixels black, PIL
shows the palette colour).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.contract.imaging import (
    ANY_FILE_MAY_DECLARE,
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_PIXELS,
    JPEG_SOS,
    JPEG_SUBSAMPLING,
    MAX_JPEG_SCANS,
    MAX_PIXELS_PER_BYTE,
    ImageFormat,
    ResizeMode,
)

# No Python control flow depends on tensors here: autograph would only triple tracing time.
_plain_graph = tf.autograph.experimental.do_not_convert

# Format codes: indices into _FORMATS (PIL's names, which imaging.MAX_PIXELS_PER_BYTE uses).
_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "UNKNOWN")
_JPEG, _PNG, _GIF, _BMP, _WEBP, _UNKNOWN = range(len(_FORMATS))
_DRAFT_SCALES = (1, 2, 4, 8)  # libjpeg's DCT scalings that PIL's draft uses
_MAX_IFD_ENTRIES = 64  # orientation sits in IFD0, which rarely has more than ~20 tags
_MAX_SEGMENTS = 4096  # JPEG markers / PNG chunks / RIFF chunks walked looking for EXIF
# imaging.MAX_PIXELS_PER_BYTE by format code; 0 = no density limit (JPEG, unknown).
_PIXELS_PER_BYTE = tuple(MAX_PIXELS_PER_BYTE.get(name, 0) for name in _FORMATS)


def _read(data: tf.Tensor, pos: tf.Tensor, n: int) -> tf.Tensor:
    """`n` bytes of `data` at `pos` as int32 [n]; zeros past the end (never raises)."""
    size = tf.strings.length(data)
    pos = tf.clip_by_value(tf.cast(pos, tf.int32), 0, size)
    raw = tf.io.decode_raw(tf.strings.substr(data, pos, n), tf.uint8)
    raw = tf.pad(raw, [[0, n - tf.shape(raw)[0]]])
    return tf.reshape(tf.cast(raw, tf.int32), [n])


def _uint(b: tf.Tensor, big_endian: tf.Tensor | bool) -> tf.Tensor:
    """Unsigned integer from int32 bytes `b` [n] (n <= 4), as int64."""
    b = tf.cast(b, tf.int64)
    weights = tf.constant([256**i for i in range(b.shape[0])], tf.int64)
    return tf.where(big_endian, tf.reduce_sum(b * weights[::-1]), tf.reduce_sum(b * weights))


@_plain_graph
def image_format(data: tf.Tensor) -> tf.Tensor:
    """Format of encoded `data` (string scalar) from its magic bytes, as int32 code."""
    head = _read(data, 0, 12)
    is_jpeg = tf.reduce_all(head[:3] == [0xFF, 0xD8, 0xFF])
    is_png = tf.reduce_all(head[:4] == [0x89, 0x50, 0x4E, 0x47])
    is_gif = tf.reduce_all(head[:4] == [0x47, 0x49, 0x46, 0x38])  # GIF8
    is_bmp = tf.reduce_all(head[:2] == [0x42, 0x4D])  # BM
    is_webp = tf.reduce_all(head[:4] == [0x52, 0x49, 0x46, 0x46]) & tf.reduce_all(
        head[8:12] == [0x57, 0x45, 0x42, 0x50]
    )  # RIFF....WEBP
    codes = tf.constant([_JPEG, _PNG, _GIF, _BMP, _WEBP, _UNKNOWN], tf.int32)
    found = tf.stack([is_jpeg, is_png, is_gif, is_bmp, is_webp, True])
    return tf.gather(codes, tf.argmax(tf.cast(found, tf.int32)))


@_plain_graph
def declared_size(data: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
    """(height, width) int64 [2] the header declares, as stored (before orientation).

    Only headers are read: this is the decompression-bomb check's input.
    """

    def jpeg():
        return tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)

    def png():  # IHDR: width, height big-endian at 16, 20
        return tf.stack([_uint(_read(data, 20, 4), True), _uint(_read(data, 16, 4), True)])

    def gif():  # logical screen: width, height little-endian at 6, 8
        return tf.stack([_uint(_read(data, 8, 2), False), _uint(_read(data, 6, 2), False)])

    def bmp():  # DIB header: OS/2 core (12 bytes) has 16-bit sides, the rest 32-bit signed
        core = _uint(_read(data, 14, 4), False) == 12
        width = tf.where(core, _uint(_read(data, 18, 2), False), _signed32(_read(data, 18, 4)))
        height = tf.where(core, _uint(_read(data, 20, 2), False), _signed32(_read(data, 22, 4)))
        return tf.abs(tf.stack([height, width]))  # negative height = top-down rows

    def webp():
        kind = _read(data, 12, 4)
        lossy = tf.reduce_all(kind == [0x56, 0x50, 0x38, 0x20])  # 'VP8 '
        lossless = tf.reduce_all(kind == [0x56, 0x50, 0x38, 0x4C])  # 'VP8L'
        low14 = tf.constant(0x3FFF, tf.int64)
        vp8 = tf.bitwise.bitwise_and(
            tf.stack([_uint(_read(data, 28, 2), False), _uint(_read(data, 26, 2), False)]), low14)
        bits = _uint(_read(data, 21, 4), False)  # 14 bits width - 1, 14 bits height - 1
        vp8l = tf.bitwise.bitwise_and(
            tf.stack([tf.bitwise.right_shift(bits, 14), bits]), low14) + 1
        vp8x = tf.stack([_uint(_read(data, 27, 3), False), _uint(_read(data, 24, 3), False)]) + 1
        return tf.where(lossy, vp8, tf.where(lossless, vp8l, vp8x))

    def unknown():
        return tf.zeros([2], tf.int64)

    return tf.switch_case(fmt, [jpeg, png, gif, bmp, webp, unknown])


@_plain_graph
def jpeg_scans(data: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
    """Start-of-scan markers of a JPEG as `imaging.open_header` counts them (FF DA byte
    pairs anywhere in the file), int64 scalar; 0 for other formats."""
    return tf.cond(
        tf.equal(fmt, _JPEG),
        lambda: tf.size(tf.strings.split(data, sep=JPEG_SOS), out_type=tf.int64) - 1,
        lambda: tf.constant(0, tf.int64),
    )


def _signed32(b: tf.Tensor) -> tf.Tensor:
    value = _uint(b, False)
    return tf.where(value >= 2**31, value - 2**32, value)


def _exif_offset_jpeg(data: tf.Tensor) -> tf.Tensor:
    """Offset of the TIFF header in the first `Exif\\0\\0` APP1 segment, or -1."""
    size = tf.cast(tf.strings.length(data), tf.int64)

    def body(i, pos, found, done):
        marker = _read(data, pos, 10)
        not_marker = marker[0] != 0xFF
        fill = marker[1] == 0xFF
        standalone = (marker[1] == 0x01) | ((marker[1] >= 0xD0) & (marker[1] <= 0xD8))
        end = (marker[1] == 0xDA) | (marker[1] == 0xD9)  # start of scan / end of image
        length = _uint(marker[2:4], True)
        exif = (marker[1] == 0xE1) & tf.reduce_all(
            marker[4:10] == [0x45, 0x78, 0x69, 0x66, 0, 0]  # 'Exif\0\0'
        )
        hit = ~not_marker & ~fill & ~standalone & ~end & exif
        step = tf.where(fill, _one, tf.where(standalone, 2 * _one, 2 + length))
        found = tf.where(hit, pos + 10, found)
        done = not_marker | end | hit
        return i + 1, pos + step, found, done

    _one = tf.constant(1, tf.int64)
    _, _, found, _ = tf.while_loop(
        lambda i, pos, found, done: (~done) & (i < _MAX_SEGMENTS) & (pos + 4 <= size),
        body,
        (tf.constant(0), tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.constant(False)),
    )
    return found


def _exif_offset_chunks(data: tf.Tensor, first: int, fourcc: list[int], big_endian: bool,
                        size_first: bool, pad_even: bool) -> tf.Tensor:
    """Walks PNG chunks (size, type, data, crc) or RIFF chunks (type, size, data, pad).

    Returns the offset of the first chunk `fourcc`'s data, or -1.
    """
    size = tf.cast(tf.strings.length(data), tf.int64)
    header_bytes = 8 if pad_even else 12  # RIFF: no CRC after the data

    def body(i, pos, found, done):
        header = _read(data, pos, 8)
        length_bytes, kind = (header[:4], header[4:]) if size_first else (header[4:], header[:4])
        length = _uint(length_bytes, big_endian)
        hit = tf.reduce_all(kind == fourcc)
        found = tf.where(hit, pos + 8, found)
        padded = length + (length % 2 if pad_even else 0)
        return i + 1, pos + header_bytes + padded, found, hit

    _, _, found, _ = tf.while_loop(
        lambda i, pos, found, done: (~done) & (i < _MAX_SEGMENTS) & (pos + 8 <= size),
        body,
        (tf.constant(0), tf.constant(first, tf.int64), tf.constant(-1, tf.int64),
         tf.constant(False)),
    )
    return found


def _orientation_from_tiff(data: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """EXIF orientation from a TIFF block at `start` (skipping an `Exif\\0\\0` prefix)."""
    prefixed = tf.reduce_all(_read(data, start, 6) == [0x45, 0x78, 0x69, 0x66, 0, 0])
    start = tf.where(prefixed, start + 6, start)
    order = _read(data, start, 2)
    little = tf.reduce_all(order == [0x49, 0x49])  # II
    big = tf.reduce_all(order == [0x4D, 0x4D])  # MM
    ifd = start + _uint(_read(data, start + 4, 4), big)
    count = tf.minimum(_uint(_read(data, ifd, 2), big), _MAX_IFD_ENTRIES)
    entries = tf.reshape(_read(data, ifd + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12])
    entries = tf.cast(entries, tf.int64)

    def field(lo: int, n: int) -> tf.Tensor:  # per-entry unsigned integer of n bytes at lo
        columns = entries[:, lo:lo + n]
        weights = tf.constant([256**i for i in range(n)], tf.int64)
        return tf.where(big, tf.reduce_sum(columns * weights[::-1], axis=1),
                        tf.reduce_sum(columns * weights, axis=1))

    tag, kind, n_values = field(0, 2), field(2, 2), field(4, 4)
    # The value sits left-aligned in the 4-byte field: SHORT (3) in 2 bytes, LONG (4) in 4.
    value = tf.where(kind == 3, field(8, 2), tf.where(kind == 4, field(8, 4), field(8, 1)))
    matches = (tag == 0x0112) & (n_values == 1) & (tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64)
                                                   < count)
    first = tf.argmax(tf.cast(matches, tf.int32))
    orientation = tf.where(tf.reduce_any(matches), value[first], tf.constant(1, tf.int64))
    valid = (little | big) & (orientation >= 1) & (orientation <= 8)
    return tf.cast(tf.where(valid, orientation, 1), tf.int32)


@_plain_graph
def exif_orientation(data: tf.Tensor, fmt: tf.Tensor | None = None) -> tf.Tensor:
    """EXIF orientation 1..8 of encoded `data` (int32 scalar; 1 when absent or broken)."""
    fmt = image_format(data) if fmt is None else fmt
    offset = tf.switch_case(
        fmt,
        [
            lambda: _exif_offset_jpeg(data),
            lambda: _exif_offset_chunks(data, 8, [0x65, 0x58, 0x49, 0x66], True, True, False),
            lambda: tf.constant(-1, tf.int64),  # GIF
            lambda: tf.constant(-1, tf.int64),  # BMP
            lambda: _exif_offset_chunks(data, 12, [0x45, 0x58, 0x49, 0x46], False, False, True),
            lambda: tf.constant(-1, tf.int64),
        ],
    )
    return tf.cond(offset >= 0, lambda: _orientation_from_tiff(data, offset),
                   lambda: tf.constant(1, tf.int32))


@_plain_graph
def draft_scale(stored_hw: tf.Tensor, target_hw: tuple[int, int], transposed: tf.Tensor
                ) -> tf.Tensor:
    """PIL's `JpegImageFile.draft` choice: largest of 1,2,4,8 <= min(W // want_w, H // want_h).

    `stored_hw` is the JPEG's (height, width) as stored; the target is upright, so a
    transposing orientation compares the stored width with the target height.
    """
    want_h, want_w = (tf.constant(side, tf.int64) for side in target_hw)
    want_w_stored = tf.where(transposed, want_h, want_w)
    want_h_stored = tf.where(transposed, want_w, want_h)
    scale = tf.minimum(stored_hw[1] // want_w_stored, stored_hw[0] // want_h_stored)
    scales = tf.constant(_DRAFT_SCALES, tf.int64)
    return tf.reduce_max(tf.where(scales <= scale, scales, 1))


def _to_rgb(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 [h, w, c] with c in 1..4 -> [h, w, 3]: alpha dropped, gray replicated."""
    return tf.cond(
        tf.shape(pixels)[-1] >= 3,
        lambda: pixels[..., :3],
        lambda: tf.tile(pixels[..., :1], [1, 1, 3]),
    )


def _bmp_palette(data: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """8-bit BMP: TF's decoder returns the palette indices [h, w, 1]; look the colours up
    (BGRA entries after the DIB header) as PIL does."""
    table = tf.reshape(_read(data, 14 + _uint(_read(data, 14, 4), False), 1024), [256, 4])
    rgb = tf.cast(tf.reverse(table[:, :3], axis=[1]), tf.uint8)
    return tf.gather(rgb, tf.cast(indices[..., 0], tf.int32))


@_plain_graph
def orient(pixels: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Applies EXIF `orientation` (1..8) to [h, w, 3] so the image is upright."""

    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: pixels,  # 0: never used
        lambda: pixels,  # 1: upright
        lambda: tf.image.flip_left_right(pixels),
        lambda: tf.image.rot90(pixels, 2),
        lambda: tf.image.flip_up_down(pixels),
        lambda: transpose(pixels),
        lambda: tf.image.rot90(pixels, 3),  # PIL ROTATE_270: 90 degrees clockwise
        lambda: tf.image.rot90(transpose(pixels), 2),  # PIL TRANSVERSE
        lambda: tf.image.rot90(pixels, 1),  # PIL ROTATE_90: counter-clockwise
    ]
    return tf.switch_case(orientation, branches)


@_plain_graph
def decode_rgb(
    data: tf.Tensor,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tf.Tensor:
    """Encoded image (string scalar) -> upright uint8 RGB [h, w, 3], like `imaging.decode_rgb`.

    `draft_size` (height, width) lets JPEG decode at the reduced DCT scale PIL's
    draft picks. Raises InvalidArgumentError for unknown formats and bombs (message: the
    pipeline's dead-letter reason), from the header, before any decoder runs.
    """
    fmt = image_format(data)
    stored_hw = declared_size(data, fmt)
    declared = stored_hw[0] * stored_hw[1]
    # A header promising more pixels than its bytes can hold (a few-KB bomb).
    density = tf.gather(tf.constant(_PIXELS_PER_BYTE, tf.int64), fmt)
    allowed = tf.maximum(tf.constant(ANY_FILE_MAY_DECLARE, tf.int64),
                         density * tf.cast(tf.strings.length(data), tf.int64))
    guards = [  # in the pipeline's order, so a file failing two gets its reason
        tf.debugging.assert_none_equal(fmt, _UNKNOWN, message="not_an_image"),
        tf.debugging.assert_less_equal(declared, tf.constant(max_pixels, tf.int64),
                                       message="too_many_pixels"),
        tf.debugging.Assert(tf.equal(density, 0) | (declared <= allowed),
                            ["too_many_pixels: more pixels than the file's bytes can hold"]),
        tf.debugging.assert_less_equal(jpeg_scans(data, fmt),
                                       tf.constant(MAX_JPEG_SCANS, tf.int64),
                                       message="too_many_scans"),
    ]
    # A graph runs an op once its inputs are ready, whatever the program order: an assert
    # no decoder depends on may fail only after (or while) a huge decode runs. Every
    # decoder below reads `data` through this identity, which waits for all the guards.
    # (Eagerly the asserts have already raised and return None.)
    with tf.control_dependencies(guards):
        data = tf.identity(data)
    orientation = exif_orientation(data, fmt)
    transposed = orientation >= 5

    def jpeg():
        scale = tf.constant(1, tf.int64) if draft_size is None else draft_scale(
            stored_hw, draft_size, transposed)
        # `ratio` is an attribute, not a tensor: one decoder per DCT scale.
        # ISLOW is libjpeg's default and what PIL decodes with; TF's default is IFAST.
        decoders = [
            lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
            for r in _DRAFT_SCALES
        ]
        index = tf.argmax(tf.cast(tf.equal(tf.constant(_DRAFT_SCALES, tf.int64), scale), tf.int32))
        return tf.switch_case(tf.cast(index, tf.int32), decoders)

    def other():
        # channels=0: WebP refuses a channel count other than the file's own.
        pixels = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
        palette_bmp = tf.equal(fmt, _BMP) & tf.equal(_uint(_read(data, 28, 2), False), 8)
        return tf.cond(palette_bmp, lambda: _bmp_palette(data, pixels),
                       lambda: _to_rgb(pixels))

    pixels = tf.cond(tf.equal(fmt, _JPEG), jpeg, other)
    pixels = tf.ensure_shape(pixels, [None, None, 3])
    return orient(pixels, orientation)


@_plain_graph
def resize_geometry(
    source_hw: tf.Tensor, target_hw: tuple[int, int], mode: ResizeMode
) -> tuple[tf.Tensor, tf.Tensor]:
    """`imaging.resize_geometry` with a tensor source size.

    Returns (scaled_hw int32 [2], box int32 [4] = top, left, bottom, right). Float64
    division and round-half-to-even, as Python's `/` and `round` compute them.
    """
    dst_h, dst_w = target_hw
    if mode is ResizeMode.SQUASH:
        return tf.constant([dst_h, dst_w]), tf.constant([0, 0, dst_h, dst_w])
    src = tf.cast(source_hw, tf.float64)
    ratios = tf.constant([dst_h, dst_w], tf.float64) / src
    scale = tf.reduce_max(ratios) if mode is ResizeMode.CROP else tf.reduce_min(ratios)
    scaled = tf.maximum(1, tf.cast(tf.round(src * scale), tf.int32))
    target = tf.constant([dst_h, dst_w])
    if mode is ResizeMode.CROP:
        scaled = tf.maximum(scaled, target)
        top_left = (scaled - target) // 2
        return scaled, tf.concat([top_left, top_left + target], 0)
    scaled = tf.minimum(scaled, target)
    top_left = (target - scaled) // 2
    return scaled, tf.concat([top_left, top_left + scaled], 0)


@_plain_graph
def resize(pixels: tf.Tensor, target_hw: tuple[int, int], mode: ResizeMode) -> tf.Tensor:
    """Antialiased bilinear resize of uint8 [h, w, 3] to uint8 [*target_hw, 3] by `mode`."""
    source_hw = tf.shape(pixels)[:2]
    scaled_hw, box = resize_geometry(source_hw, target_hw, mode)

    def scale():
        # PIL resamples the rows, rounds to uint8, then resamples the columns. One float
        # pass over both sides is off by a level on many values; the same two passes
        # match PIL's on nearly all (tests/test_imaging_tf.py, docs/performance.md).
        rows = _resample(tf.cast(pixels, tf.float32), tf.stack([source_hw[0], scaled_hw[1]]))
        return tf.cast(_resample(rows, scaled_hw), tf.uint8)

    scaled = tf.cond(tf.reduce_all(tf.equal(scaled_hw, source_hw)), lambda: pixels, scale)
    top, left, bottom, right = tf.unstack(box)
    if mode is ResizeMode.CROP:
        scaled = scaled[top:bottom, left:right]
    elif mode is ResizeMode.PAD:
        scaled = tf.pad(scaled, [[top, target_hw[0] - bottom], [left, target_hw[1] - right],
                                 [0, 0]])
    return tf.ensure_shape(scaled, [target_hw[0], target_hw[1], 3])


def _resample(pixels: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """float32 [h, w, 3] -> float32 [*size, 3] holding uint8 levels: one antialiased
    bilinear pass, rounded half up as PIL rounds after its fixed-point filter."""
    resized = tf.image.resize(pixels, size, method="bilinear", antialias=True)
    return tf.clip_by_value(tf.floor(resized + 0.5), 0, 255)


@_plain_graph
def stored_pixels(pixels: tf.Tensor, image_format: ImageFormat | str,
                  jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> tf.Tensor:
    """uint8 [h, w, 3] -> uint8 [h, w, 3]: the pixels the trainer decodes after the
    pipeline stored `pixels` as `image_format` (`imaging.encode`), i.e. unchanged for the
    lossless formats and the JPEG round trip for JPEG. TensorFlow's encoder with PIL's
    settings (baseline, not optimized, the same quality and chroma subsampling) writes the
    same coefficients as PIL, and the decode is the trainer's (`trainer.input`)."""
    if ImageFormat(image_format) is not ImageFormat.JPEG:
        return pixels
    encoded = tf.io.encode_jpeg(pixels, quality=jpeg_quality, progressive=False,
                                optimize_size=False,
                                chroma_downsampling=JPEG_SUBSAMPLING == "4:2:0")
    decoded = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
    return tf.reshape(decoded, tf.shape(pixels))


@_plain_graph
def process_image(
    data: tf.Tensor,
    target_hw: tuple[int, int],
    mode: ResizeMode = ResizeMode.SQUASH,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stored_as: ImageFormat | str | None = None,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> tf.Tensor:
    """Source file bytes (string scalar) -> uint8 [*target_hw, 3].

    stored_as None: the pipeline's pixels before they are stored, i.e.
    `imaging.resize(imaging.decode_rgb(...))`. A format (the serving signature passes
    the manifest's): the pixels the trainer reads back from the shards (`stored_pixels`).
    """
    pixels = resize(decode_rgb(data, target_hw, max_pixels), target_hw, ResizeMode(mode))
    if stored_as is None:
        return pixels
    return tf.ensure_shape(stored_pixels(pixels, stored_as, jpeg_quality),
                           [target_hw[0], target_hw[1], 3])

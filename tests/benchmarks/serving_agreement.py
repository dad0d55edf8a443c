"""Where serving disagrees with training, cause by cause, at 64, 128 and 224 px.

    .venv/bin/python -m tests.benchmarks.serving_agreement [--sizes 64 128 224]
        [--seeds 0 1 2] [--train_per_class 20] [--held_out_per_class 30] [--epochs 8]

Held-out photo set: crops of ten photos bundled in the scikit-image wheel (one class
each, `CLASSES`), every file in a random encoding (`ENCODINGS`: JPEG at qualities 50-98,
4:2:0 and 4:4:4, progressive, EXIF-rotated 3/6/8, grayscale, CMYK; PNG with and without
alpha; lossy and lossless WebP; BMP; GIF) at a random size from well under the target
(upscaled) to four times over it (JPEG DCT scaling), different for every seed.

For each size and seed the pipeline's own pure function (`imaging.process_image`, what
the Beam step calls) makes the stored images, the default model (small_cnn, normalised by
the train pixels' mean/std) trains on them for a few epochs, and on the held-out files the
model on the stored images (what the trainer's metrics measure) is compared with the
model on the serving graph's pixels of the original files (what `serving_default`
computes). Agreement = the share of held-out images whose predicted class is the same,
as `trainer.agreement.measure` computes it from a training run; medians over the seeds.

Rows (served pixels against the stored ones):
  before       stored JPEG q90 4:2:0; serving: one float resize pass, no stored format
  resize       the same model; serving: PIL's two rounded passes (resize cause removed)
  store        the same model; serving ends with the stored JPEG round trip, one-pass
               resize (lossy-storage cause removed)
  after        both: the serving graph as shipped (`imaging_tf.process_image(stored_as=)`)
  png          a model trained on lossless PNG storage; serving two-pass, nothing stored
  jpeg444_q95  a model trained on JPEG q95 4:4:4; serving two-pass, no stored format
The decode path (DCT scaling, EXIF, CMYK, gray, palettes, alpha) is checked on pixels:
the serving graph's decoded pixels against PIL's, largest difference over the held-out
files (it is 0, so there is no decode-path row). Then: decoding throughput of each
stored format (what bounds the trainer's input) and the serving graph's images/s with and
without the stored-format round trip, measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from pipelines.contract import imaging, imaging_tf
from pipelines.contract.imaging import ImageFormat, ImageSpec, ResizeMode
from trainer import input as input_lib
from trainer.model import make_model

# label -> skimage.data loader; all bundled in the wheel (no download).
CLASSES = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket",
           "galaxies": "hubble_deep_field", "retina": "retina",
           "cells": "immunohistochemistry", "motorcycle": "stereo_motorcycle",
           "colours": "colorwheel", "camera": "camera"}
ENCODINGS = ("jpeg", "jpeg444", "progressive", "exif3", "exif6", "exif8", "gray", "cmyk",
             "png", "png_rgba", "webp", "webp_lossless", "bmp", "gif")
CROP_SCALE = (0.08, 0.25)
_ROTATIONS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
              8: Image.Transpose.ROTATE_270}  # stored so that the EXIF orientation uprights it


def load_photos() -> dict[str, Image.Image]:
    import skimage.data

    photos = {}
    for label, loader in CLASSES.items():
        pixels = getattr(skimage.data, loader)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        photos[label] = Image.fromarray(pixels[..., :3].astype(np.uint8))
    return photos


def encode_source(image: Image.Image, encoding: str, rng: np.random.Generator) -> bytes:
    """`image` (upright RGB) as a user's file in `encoding`."""
    buffer = io.BytesIO()
    quality = int(rng.integers(50, 99))
    if encoding in ("jpeg", "jpeg444", "progressive"):
        image.save(buffer, "JPEG", quality=quality, subsampling=0 if encoding == "jpeg444" else 2,
                   progressive=encoding == "progressive")
    elif encoding.startswith("exif"):
        orientation = int(encoding[4:])
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.transpose(_ROTATIONS[orientation]).save(buffer, "JPEG", quality=quality,
                                                      exif=exif)
    elif encoding == "gray":
        image.convert("L").save(buffer, "JPEG", quality=quality)
    elif encoding == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif encoding == "png":
        image.save(buffer, "PNG")
    elif encoding == "png_rgba":
        rgba = image.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(buffer, "PNG")
    elif encoding == "webp":
        image.save(buffer, "WEBP", quality=quality)
    elif encoding == "webp_lossless":
        image.save(buffer, "WEBP", lossless=True)
    elif encoding == "bmp":
        image.save(buffer, "BMP")
    else:
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "GIF")
    return buffer.getvalue()


def photo_set(photos: dict[str, Image.Image], per_class: int, size: int, seed: int
              ) -> tuple[list[bytes], np.ndarray, list[str]]:
    """(files, label ids, encodings): random crops of each class's photo, each file at a
    random size from 0.6x to 4x `size` in a random encoding. Crops are small patches
    (`CROP_SCALE` of the photo's sides): whole photos are told apart with near certainty,
    patches leave a small model unsure on some images, as real held-out data does."""
    rng = np.random.default_rng([seed, size])
    files, labels, encodings = [], [], []
    for label_id, photo in enumerate(photos.values()):
        for _ in range(per_class):
            scale = float(rng.uniform(*CROP_SCALE))
            crop_w, crop_h = int(photo.width * scale), int(photo.height * scale)
            left = int(rng.integers(0, photo.width - crop_w + 1))
            top = int(rng.integers(0, photo.height - crop_h + 1))
            side = float(rng.choice([rng.uniform(0.6, 1.0), rng.uniform(1.0, 4.0)], p=[.2, .8]))
            aspect = float(rng.uniform(0.75, 1.33))
            width, height = max(8, int(size * side * aspect)), max(8, int(size * side))
            crop = photo.resize((width, height), Image.Resampling.BILINEAR,
                                box=(left, top, left + crop_w, top + crop_h))
            encoding = str(rng.choice(ENCODINGS))
            files.append(encode_source(crop, encoding, rng))
            labels.append(label_id)
            encodings.append(encoding)
    return files, np.asarray(labels), encodings


def encode_stored(files: list[bytes], size: int, store: str) -> tuple[list[bytes], str]:
    """(stored image bytes, trainer's image_format) the pipeline writes from `files` with
    the stored format `store` (jpeg, png, raw, or jpeg444_q95: not a pipeline option,
    the same resized pixels encoded here)."""
    if store != "jpeg444_q95":
        spec = ImageSpec(size, size, image_format=ImageFormat(store))
        return [imaging.process_image(d, spec).encoded for d in files], store
    encoded = []
    for data in files:
        resized = imaging.resize_image(imaging.decode_image(data, (size, size))[0],
                                       (size, size), ResizeMode.SQUASH)
        buffer = io.BytesIO()
        resized.save(buffer, "JPEG", quality=95, subsampling=0)
        encoded.append(buffer.getvalue())
    return encoded, "jpeg"


def stored_images(files: list[bytes], size: int, store: str) -> np.ndarray:
    """uint8 [N, size, size, 3]: what the trainer decodes from those stored images."""
    encoded, image_format = encode_stored(files, size, store)
    return input_lib.decode_stored(tf.constant(encoded), image_format, size, size).numpy()


def _one_pass_resize(pixels: tf.Tensor, target_hw: tuple[int, int]) -> tf.Tensor:
    """The serving graph's resize before issue 20: one float pass over both sides."""
    resized = tf.image.resize(tf.cast(pixels, tf.float32), target_hw, method="bilinear",
                              antialias=True)
    return tf.cast(tf.clip_by_value(tf.floor(resized + 0.5), 0, 255), tf.uint8)


def served_images(files: list[bytes], size: int, two_pass: bool, stored_as: str | None
                  ) -> np.ndarray:
    """uint8 [N, size, size, 3]: the serving graph's pixels of the original `files`."""
    target = (size, size)

    def serve(data):
        pixels = imaging_tf.decode_rgb(data, target)
        resized = (imaging_tf.resize(pixels, target, ResizeMode.SQUASH) if two_pass
                   else _one_pass_resize(pixels, target))
        return resized if stored_as is None else imaging_tf.stored_pixels(resized, stored_as)

    dataset = tf.data.Dataset.from_tensor_slices(files).map(
        serve, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
    return np.concatenate([batch.numpy() for batch in dataset])


def pixel_differences(photos, size: int, seed: int) -> None:
    """Prints, for the held-out files of `seed`, how far each row's served pixels are from
    the stored ones (mean absolute difference in levels, share of values that differ), and
    the largest difference between the serving graph's and PIL's decoded pixels."""
    files, _, _ = photo_set(photos, 30, size, seed + 1000)
    stored = stored_images(files, size, "jpeg").astype(int)
    lossless = stored_images(files, size, "png").astype(int)
    served = {
        "before": (stored, served_images(files, size, False, None)),
        "resize": (stored, served_images(files, size, True, None)),
        "store": (stored, served_images(files, size, False, "jpeg")),
        "after": (stored, served_images(files, size, True, "jpeg")),
        "png": (lossless, served_images(files, size, True, None)),
    }
    for name, (reference, pixels) in served.items():
        diff = np.abs(pixels.astype(int) - reference)
        print(f"{size:4d} px  pixels {name:8s} mean |served - stored| {diff.mean():.3f} levels, "
              f"{np.mean(diff > 0):.4f} of values differ, max {diff.max()}", flush=True)
    target = (size, size)
    decode = tf.function(lambda d: imaging_tf.decode_rgb(d, target),
                         input_signature=[tf.TensorSpec([], tf.string)])
    worst = max(int(np.abs(decode(tf.constant(d)).numpy().astype(int)
                           - imaging.decode_rgb(d, target)[0].astype(int)).max())
                for d in files)
    print(f"{size:4d} px  decoded pixels, serving graph vs PIL: max difference {worst} "
          f"over {len(files)} files", flush=True)


def train(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    pixels = images.reshape(-1, 3).astype(np.float64)
    model = make_model("small_cnn", images.shape[1:], len(CLASSES), pixels.mean(0),
                       pixels.std(0))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy")
    model.fit(images, labels, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    return model


def predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return np.argmax(model.predict(images, batch_size=64, verbose=0), axis=-1)


def one_run(photos, size: int, seed: int, args) -> dict[str, tuple[float, float, float]]:
    """{row: (agreement, accuracy on stored, accuracy served)} for one size and seed."""
    train_files, train_labels, _ = photo_set(photos, args.train_per_class, size, seed)
    held_files, held_labels, _ = photo_set(photos, args.held_out_per_class, size, seed + 1000)
    rows = {}

    def row(name, model, stored, served):
        on_stored, on_served = predict(model, stored), predict(model, served)
        rows[name] = (float(np.mean(on_stored == on_served)),
                      float(np.mean(on_stored == held_labels)),
                      float(np.mean(on_served == held_labels)))

    model = train(stored_images(train_files, size, "jpeg"), train_labels, seed, args.epochs)
    stored = stored_images(held_files, size, "jpeg")
    row("before", model, stored, served_images(held_files, size, False, None))
    row("resize", model, stored, served_images(held_files, size, True, None))
    row("store", model, stored, served_images(held_files, size, False, "jpeg"))
    row("after", model, stored, served_images(held_files, size, True, "jpeg"))
    if not args.only_default:
        for store in ("png", "jpeg444_q95"):
            model = train(stored_images(train_files, size, store), train_labels, seed,
                          args.epochs)
            row(store, model, stored_images(held_files, size, store),
                served_images(held_files, size, True, None))
    return rows


def decode_pass(files: list[bytes], size: int, store: str):
    """(stored KiB per image, a function that runs the trainer's decode over them once and
    returns the number of images)."""
    encoded, image_format = encode_stored(files, size, store)
    dataset = tf.data.Dataset.from_tensor_slices(encoded * max(1, 4000 // len(encoded))).batch(
        64).map(lambda b: input_lib.decode_stored(b, image_format, size, size),
                num_parallel_calls=tf.data.AUTOTUNE)
    return np.mean([len(e) for e in encoded]) / 1024, lambda: sum(
        int(batch.shape[0]) for batch in dataset)


def serving_pass(files: list[bytes], size: int, stored_as: str | None):
    """A function that runs the serving signature's decode/resize(/stored format) over
    `files` in batches of 32, as `trainer.serving` maps it, and returns the image count."""
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(batch):
        return tf.map_fn(lambda d: imaging_tf.process_image(d, (size, size), stored_as=stored_as),
                         batch, parallel_iterations=8,
                         fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))

    batches = [tf.constant(files[i:i + 32]) for i in range(0, len(files), 32)]
    return lambda: sum(int(serve(batch).shape[0]) for batch in batches)


def best_rates(passes: dict[str, object], rounds: int = 5) -> dict[str, float]:
    """Images/s of each pass: the best of `rounds` rounds, every pass once a round, so a
    burst of load from other processes on a shared machine hits all of them alike."""
    for run in passes.values():
        run()  # warm-up: tracing, first reads
    best = dict.fromkeys(passes, 0.0)
    for _ in range(rounds):
        for name, run in passes.items():
            started = time.perf_counter()
            count = run()
            best[name] = max(best[name], count / (time.perf_counter() - started))
    return best


def throughput(photos, size: int) -> None:
    files, _, _ = photo_set(photos, 10, size, 99)
    stores = ("jpeg", "jpeg444_q95", "png", "raw")
    sizes, passes = {}, {}
    for store in stores:
        sizes[store], passes[store] = decode_pass(files, size, store)
    passes["serving"] = serving_pass(files, size, None)
    passes["serving+jpeg"] = serving_pass(files, size, "jpeg")
    rates = best_rates(passes)
    for store in stores:
        print(f"{size:4d} px  trainer input decode  {store:12s} {sizes[store]:6.1f} KiB/image "
              f"{rates[store]:8.0f} images/s ({rates[store] / rates['jpeg']:.2f}x jpeg)",
              flush=True)
    print(f"{size:4d} px  serving graph  without stored format {rates['serving']:6.0f} images/s,"
          f" with the JPEG round trip {rates['serving+jpeg']:6.0f} images/s "
          f"({rates['serving+jpeg'] / rates['serving']:.2f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_per_class", type=int, default=20)
    parser.add_argument("--held_out_per_class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--only_default", action="store_true",
                        help="skip the models trained on other stored formats")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--pixels_only", action="store_true",
                        help="only the pixel differences (no training, no throughput)")
    parser.add_argument("--throughput_only", action="store_true")
    parser.add_argument("--skip_pixels", action="store_true")
    args = parser.parse_args()
    photos = load_photos()
    started = time.perf_counter()
    print(f"{len(CLASSES)} classes, {args.train_per_class} train / "
          f"{args.held_out_per_class} held-out files a class, {args.epochs} epochs, small_cnn, "
          f"seeds {args.seeds}; agreement | accuracy on stored | accuracy served "
          f"(medians over the seeds)")
    for size in [] if args.throughput_only or args.skip_pixels else args.sizes:
        pixel_differences(photos, size, args.seeds[0])
    if args.pixels_only:
        return
    for size in [] if args.throughput_only else args.sizes:
        runs = []
        for seed in args.seeds:
            runs.append(one_run(photos, size, seed, args))
            print(f"  ({size} px, seed {seed} done at {time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
        for name in runs[0]:
            values = [run[name] for run in runs]
            median = [statistics.median(v[i] for v in values) for i in range(3)]
            each = " ".join(f"{v[0]:.3f}" for v in values)
            print(f"{size:4d} px  {name:12s} agreement {median[0]:.3f} (seeds: {each})  "
                  f"accuracy stored {median[1]:.3f} served {median[2]:.3f}", flush=True)
    if not args.skip_throughput:
        for size in args.sizes:
            throughput(photos, size)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

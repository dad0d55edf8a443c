"""The exported SavedModel: raw image file bytes in, probabilities and labels out.

    serving_default(image_bytes: string [N]) ->
        probabilities: float32 [N, num_classes], class_id: int64 [N], label: string [N]

Each image is decoded and resized by `pipelines.contract.imaging_tf` (the TF-ops port of the
pipeline's PIL code, EXIF orientation included, held to it by a parity test) to the
manifest's size and resize mode, then passed through the shards' storage (the stored JPEG's
encode and decode), then the model applies the normalisation from the
transform output and the network. Any JPEG/PNG/GIF/BMP/WebP of any size goes in;
what training saw is what serving computes. A file the pipeline refuses from its header
(not_an_image, too_many_pixels, too_many_scans) fails the request with an
InvalidArgumentError naming that reason, before any decoder has run.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipelines.contract import imaging_tf
from pipelines.contract.imaging import DEFAULT_JPEG_QUALITY, ResizeMode

SIGNATURE = "serving_default"
INPUT = "image_bytes"


def serving_fn(model: keras.Model, labels: tuple[str, ...], height: int, width: int,
               resize: str, max_pixels: int, stored_as: str | None = None,
               jpeg_quality: int = DEFAULT_JPEG_QUALITY):
    """The serving function (not yet traced) over a batch of encoded images.

    stored_as / jpeg_quality: the shards' image format, so the model is served the
    pixels it was trained on (`imaging_tf.stored_pixels`: the stored JPEG's loss)."""
    vocabulary = tf.constant(list(labels))
    mode = ResizeMode(resize)

    def decode(data):
        return imaging_tf.process_image(data, (height, width), mode, max_pixels, stored_as,
                                        jpeg_quality)

    def serve(image_bytes):
        images = tf.map_fn(decode, image_bytes, parallel_iterations=8,
                           fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8))
        probabilities = tf.cast(model(images, training=False), tf.float32)
        class_id = tf.argmax(probabilities, axis=-1)
        return {"probabilities": probabilities, "class_id": class_id,
                "label": tf.gather(vocabulary, class_id)}

    return serve


def export(model: keras.Model, path: str, labels: tuple[str, ...], height: int, width: int,
           resize: str = "squash", max_pixels: int = 100_000_000, stored_as: str | None = None,
           jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> None:
    """Writes the SavedModel with the `serving_default` signature to `path`."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SIGNATURE,
        serving_fn(model, labels, height, width, resize, max_pixels, stored_as, jpeg_quality),
        input_signature=[tf.TensorSpec([None], tf.string, name=INPUT)],
    )
    archive.write_out(path, verbose=False)

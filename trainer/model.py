"""The classifiers: uint8 pixels in, class probabilities out, normalisation inside.

Keras 3, not tf_keras. TF 2.21's `tf.keras` is Keras 3; tensorflow-transform 1.21
still builds on tf_keras, and its `transform_features_layer()` is a tf_keras layer
that cannot live in a Keras 3 model (mixing the two packages fails on layer and
variable types). Our transform output only computes two per-channel constants
(pixel mean and std over the train split, `pipelines.stats.analyzers`), so we read those
numbers once (`pipelines.contract.transform_output`) and bake them into a Keras 3
`Normalization` layer. The model then holds the whole transform: training, the
SavedModel and any later re-export apply the same arithmetic, and the trainer and
serving code import Keras 3 only (tf_keras is loaded just to read the transform).

Applications are built with `weights=None` and `include_top=False`; ours adds
global average pooling and a float32 softmax (float32 even under mixed precision,
so probabilities sum to 1).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np


def normalization(mean: np.ndarray, std: np.ndarray, scale: float = 1.0) -> keras.layers.Layer:
    """(x - mean) / std per channel on 0..255 pixels, times `scale`.

    `scale` undoes a fixed rescaling a backbone applies first (EfficientNet divides by
    255 internally), so its convolutions still see unit-variance inputs.
    """
    std = np.maximum(np.asarray(std, np.float64), 1e-3) / scale
    return keras.layers.Normalization(mean=np.asarray(mean, np.float64).tolist(),
                                      variance=np.square(std).tolist(), name="normalize")


def _pool(x):
    return keras.layers.GlobalAveragePooling2D()(x)


def _channel_means(x):
    """[B, H, W, C] -> [B, C], as GlobalAveragePooling2D, in two contiguous passes.

    Pooling over H and W at once reduces with a stride of C (3) floats, which made
    the pool most of the linear probe's cost; the mean over rows of the [B, H, W*C]
    view runs along contiguous memory, and the mean of W equal-sized column means is
    the mean. Built-in layers only, so saved models need no custom objects.
    """
    _, height, width, channels = x.shape
    rows = keras.layers.Reshape((height, width * channels))(x)
    columns = keras.layers.GlobalAveragePooling1D()(rows)  # [B, W*C]
    return keras.layers.GlobalAveragePooling1D()(
        keras.layers.Reshape((width, channels))(columns))


def _small_cnn(x):
    for filters in (32, 64, 128, 256):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        # momentum 0.9: moving statistics settle within tens of steps, not hundreds.
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
    return keras.layers.Dropout(0.2)(_pool(x))


def _application(builder: Callable, **kwargs) -> Callable:
    def build(x):
        backbone = builder(include_top=False, weights=None, input_shape=tuple(x.shape[1:]),
                           pooling="avg", **kwargs)
        return keras.layers.Dropout(0.2)(backbone(x))
    return build


BACKBONES: dict[str, tuple[Callable, float]] = {
    # name: (features from normalised pixels, factor the backbone's own rescaling needs)
    "small_cnn": (_small_cnn, 1.0),
    "mobilenet_v3_small": (_application(keras.applications.MobileNetV3Small,
                                        include_preprocessing=False), 1.0),
    "efficientnet_b0": (_application(keras.applications.EfficientNetB0), 255.0),
    "resnet50": (_application(keras.applications.ResNet50), 1.0),
}


def make_model(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    mean: np.ndarray,
    std: np.ndarray,
) -> keras.Model:
    """A classifier over uint8 images.

    Args:
      name: `linear` (normalise, global average pool, dense: a
        probe that costs nothing, to benchmark the input pipeline) or one of BACKBONES.
      image_shape: (height, width, 3).
      num_classes: number of labels.
      mean, std: float32 [3], per-channel statistics of 0..255 train pixels.
    Returns:
      Model: uint8 [B, H, W, 3] -> float32 [B, num_classes] softmax probabilities.
    """
    inputs = keras.Input(image_shape, dtype="uint8", name="image")
    if name == "linear":
        # Pool, then normalise: the same function (the normalisation is affine per
        # channel), but on [B, 3] instead of [B, H, W, 3], so the probe costs next to
        # nothing beside the input pipeline it measures.
        x = normalization(mean, std)(_channel_means(keras.ops.cast(inputs, "float32")))
    else:
        features, scale = BACKBONES[name]
        x = features(normalization(mean, std, scale)(inputs))
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)

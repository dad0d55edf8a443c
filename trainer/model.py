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

Applications are built with `include_top=False` and average pooling; ours adds a
float32 softmax (float32 even under mixed precision, so probabilities sum to 1). From
scratch (`weights="none"`) they get the mean/std normalisation; with pretrained weights
the input scaling those weights were trained with, also inside the model, so the
SavedModel serves what was trained (docs/training.md): ImageNet weights and foreign
files get the application's own preprocessing, a weights file this trainer wrote
(`save_backbone_weights`) says in the file which one it learnt with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

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


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be had (ImageNet offline, or an unreadable file)."""


@dataclasses.dataclass(frozen=True)
class Application:
    """A Keras application: how to build it, and the input its pretrained weights expect.

    `builder(include_top=False, weights=..., input_shape=..., pooling="avg", **kwargs)`.
    From scratch, the tf.Transform mean/std normalisation feeds it; `scratch_kwargs` turn
    off any rescaling of its own and `scratch_scale` undoes one that cannot be turned off
    (EfficientNet divides by 255 internally). With pretrained weights its own
    preprocessing applies instead: `pretrained_kwargs` turn it on, and `preprocess`,
    when set, maps float 0..255 RGB to what the weights were trained on.
    """

    builder: Callable
    scratch_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    scratch_scale: float = 1.0
    pretrained_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    preprocess: Callable | None = None


_OFF, _ON = {"include_preprocessing": False}, {"include_preprocessing": True}
APPLICATIONS: dict[str, Application] = {
    # MobileNetV3 and EfficientNetV2 rescale to [-1, 1] or ImageNet statistics themselves
    # when include_preprocessing; EfficientNet(B0) always does (Rescaling + Normalization);
    # ResNet50's weights expect Caffe's BGR with the ImageNet mean subtracted.
    "mobilenet_v3_small": Application(keras.applications.MobileNetV3Small, _OFF, 1.0, _ON),
    "mobilenet_v3_large": Application(keras.applications.MobileNetV3Large, _OFF, 1.0, _ON),
    "efficientnet_b0": Application(keras.applications.EfficientNetB0, {}, 255.0, {}),
    "efficientnet_v2_b0": Application(keras.applications.EfficientNetV2B0, _OFF, 1.0, _ON),
    "resnet50": Application(keras.applications.ResNet50,
                            preprocess=keras.applications.resnet50.preprocess_input),
}
BACKBONES = ("small_cnn", *APPLICATIONS)
SCRATCH_BN_MOMENTUM = 0.9  # as small_cnn's: settles within tens of steps


# A weights file records the input scaling its backbone learnt with, in this HDF5 attribute
# of the file's root: NORMALIZATION (the tf.Transform mean/std, a from-scratch run of ours)
# or APPLICATION (the application's own preprocessing). Files without it (ImageNet weights
# saved by anyone, a random backbone) are APPLICATION, what Keras' own weights expect.
SCALING_ATTRIBUTE = "imagebeam_input_scaling"
NORMALIZATION, APPLICATION = "normalization", "application"


def weights_scaling(weights: str) -> str:
    """The input scaling `weights` (none, imagenet or a file) were trained with.

    Loaded with another scaling than they learnt with, weights see other pixels: fine-tuning
    from a from-scratch run of ours with the application's [-1, 1] rescaling instead of
    mean/std ended below chance (docs/training.md).
    """
    if weights == "none":
        return NORMALIZATION
    if weights == "imagenet":
        return APPLICATION
    import h5py  # deferred: only weights files need it
    import tensorflow as tf  # gfile: the file may be on Cloud Storage

    try:
        with tf.io.gfile.GFile(weights, "rb") as handle, h5py.File(handle, "r") as file:
            scaling = file.attrs.get(SCALING_ATTRIBUTE, APPLICATION)
    except (OSError, tf.errors.OpError):
        return APPLICATION  # not readable: make_backbone says so when it loads
    return scaling.decode() if isinstance(scaling, bytes) else str(scaling)


def input_scaling(model: keras.Model) -> str:
    """NORMALIZATION when `model` (from make_model) standardises its input with mean/std,
    else APPLICATION."""
    return NORMALIZATION if any(layer.name == "normalize" for layer in model.layers) \
        else APPLICATION


def save_backbone_weights(model: keras.Model, path: str) -> None:
    """Writes the backbone of `model` (from make_model) as a weights file for `--weights
    PATH`, recording the input scaling it learnt with, so a run loading it keeps it."""
    import shutil
    import tempfile

    import h5py
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:  # h5py writes local files only
        local = f"{tmp}/backbone.weights.h5"
        model.get_layer("backbone").save_weights(local)
        with h5py.File(local, "a") as file:
            file.attrs[SCALING_ATTRIBUTE] = input_scaling(model)
        if "://" in path:
            tf.io.gfile.copy(local, path, overwrite=True)
        else:
            shutil.copyfile(local, path)


def make_backbone(name: str, image_shape: tuple[int, int, int],
                  weights: str = "none", scaling: str | None = None) -> keras.Model:
    """The application `name` without its top, pooled: float [B, H, W, 3] -> [B, features].

    weights: `none` (random), `imagenet` (downloaded by Keras, cached under ~/.keras) or
    the path of a weights file (`.weights.h5`, as `backbone.save_weights` writes) of the
    same application and input shape. Raises WeightsUnavailable when they cannot be had.
    scaling: NORMALIZATION builds it without its own preprocessing, APPLICATION with it;
    by default what `weights` were trained with (weights_scaling).
    """
    app = APPLICATIONS[name]
    scaling = scaling or weights_scaling(weights)
    kwargs = app.scratch_kwargs if scaling == NORMALIZATION else app.pretrained_kwargs
    try:
        backbone = app.builder(include_top=False,
                               weights="imagenet" if weights == "imagenet" else None,
                               input_shape=tuple(image_shape), pooling="avg", **kwargs)
    except Exception as err:  # Keras raises a bare Exception on a failed download
        if weights != "imagenet":
            raise
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsUnavailable(
            f"--weights imagenet needs the internet to download ImageNet weights; pass "
            f"--weights PATH to a weights file ({first_line})") from err
    if weights not in ("none", "imagenet"):
        try:
            backbone.load_weights(weights)
        except (OSError, ValueError) as err:
            raise WeightsUnavailable(
                f"--weights {weights}: not a weights file of {name} at {image_shape}: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return backbone


def settle_batch_norm(backbone: keras.Model, momentum: float = SCRATCH_BN_MOMENTUM) -> None:
    """Sets every BatchNormalization layer of `backbone` to `momentum`.

    The applications keep ImageNet's momentum (0.99 to 0.999): their moving statistics
    need thousands of steps to leave their initial values, while a user's folder trains
    for tens or hundreds. From scratch the network then evaluates (inference mode, moving
    statistics) as a different network from the one it trained (batch statistics), at
    chance. With pretrained weights the backbone runs in inference mode and this does
    not apply.
    """
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def make_model(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    mean: np.ndarray,
    std: np.ndarray,
    weights: str = "none",
) -> keras.Model:
    """A classifier over uint8 images, its input preprocessing inside.

    Args:
      name: `linear` (normalise, global average pool, dense: a
        probe that costs nothing, to benchmark the input pipeline), `small_cnn`, or one of
        APPLICATIONS.
      image_shape: (height, width, 3).
      num_classes: number of labels.
      mean, std: float32 [3], per-channel statistics of 0..255 train pixels: the
        normalisation of models trained from scratch.
      weights: `none`, `imagenet` or a weights file (applications only, see
        make_backbone). Pretrained weights bring the scaling they were trained with
        (weights_scaling): the application's own preprocessing, or mean/std for a file of
        ours from a from-scratch run. The backbone is the layer named `backbone`.
    Returns:
      Model: uint8 [B, H, W, 3] -> float32 [B, num_classes] softmax probabilities.
    """
    inputs = keras.Input(image_shape, dtype="uint8", name="image")
    if name == "linear" or name == "small_cnn":
        if weights != "none":
            raise ValueError(f"--weights {weights}: {name} has no pretrained weights")
    if name == "linear":
        # Pool, then normalise: the same function (the normalisation is affine per
        # channel), but on [B, 3] instead of [B, H, W, 3], so the probe costs next to
        # nothing beside the input pipeline it measures.
        x = normalization(mean, std)(_channel_means(keras.ops.cast(inputs, "float32")))
    elif name == "small_cnn":
        x = _small_cnn(normalization(mean, std)(inputs))
    else:
        app = APPLICATIONS[name]
        scaling = weights_scaling(weights)
        backbone = make_backbone(name, image_shape, weights, scaling)
        backbone.name = "backbone"
        if weights == "none":
            settle_batch_norm(backbone)
        if scaling == NORMALIZATION:
            # The target's own statistics: the weights learnt on standardised pixels.
            x = normalization(mean, std, app.scratch_scale)(inputs)
        else:
            x = keras.ops.cast(inputs, "float32")
            if app.preprocess is not None:
                x = app.preprocess(x)
        # training=False: BatchNorm stays in inference mode when the backbone is unfrozen
        # for fine-tuning (Keras' transfer-learning guide); from scratch it learns its
        # statistics as before.
        x = backbone(x, training=False) if weights != "none" else backbone(x)
        x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)

"""Train-time augmentation with Keras 3 preprocessing layers, in tf.data, on train batches only.

    --augment none | light | strong | a comma list of names (trainer/config.py)
    light  = flip, zoom, rotate, contrast, brightness
    strong = light + randaugment + mix (MixUp or CutMix, one per batch)

Where: a map over decoded uint8 batches in the train input pipeline (`trainer.input`),
after the batch is decoded and before prefetch, so it runs on the CPU in parallel with
the train step and never in the model: the exported SavedModel, validation, test and
the serving-agreement check see no augmentation at all. (docs/performance.md has the
input images/s with each preset; tests/benchmarks/trainer_augment.py reruns them.)

Determinism. Keras' layers draw from a SeedGenerator variable that every call advances;
with parallel map calls the order of those advances, and so the draws, would depend on
thread timing. Instead every layer draws from `BatchSeeds`: seeds folded from one
per-batch seed, itself (run seed, global batch number). A batch's augmentation is then a
pure function of its images and its number, whatever the parallelism, and a run resumed
mid-epoch augments the remaining batches exactly as the uninterrupted run would have.

Mixing (MixUp, CutMix) mixes labels too: batches then carry float32 [B, K] label
distributions instead of int64 [B] ids, and `soft_or_sparse_crossentropy` and
`SoftOrSparseAccuracy` accept both, so validation keeps its integer labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from keras.src.random.seed_generator import SeedGenerator

from trainer.config import AUGMENT_NAMES

_RANGE = (0.0, 255.0)
# One builder per name; factors are moderate: photos of objects, where a class survives
# a mirror image, a crop of up to a fifth, a tilt of up to 18 degrees.
_LAYERS: dict[str, Callable[[], keras.layers.Layer]] = {
    "flip": lambda: keras.layers.RandomFlip("horizontal"),
    # Negative factors zoom in: a random crop, resized back (reflect fills nothing here).
    "zoom": lambda: keras.layers.RandomZoom((-0.2, 0.0), fill_mode="reflect"),
    "rotate": lambda: keras.layers.RandomRotation(0.05, fill_mode="reflect"),
    "contrast": lambda: keras.layers.RandomContrast(0.2, value_range=_RANGE),
    "brightness": lambda: keras.layers.RandomBrightness(0.2, value_range=_RANGE),
    "randaugment": lambda: keras.layers.RandAugment(value_range=_RANGE, num_ops=2, factor=0.5),
    "mixup": lambda: keras.layers.MixUp(alpha=0.2),
    "cutmix": lambda: keras.layers.CutMix(factor=1.0),
}
MIXING = ("mixup", "cutmix", "mix")
assert set(AUGMENT_NAMES) == {*_LAYERS, "mix"}


def mixes(names: Sequence[str]) -> bool:
    """Whether batches carry mixed (float [B, K]) labels."""
    return any(name in MIXING for name in names)


class BatchSeeds(SeedGenerator):
    """A SeedGenerator without state: the n-th draw of a trace is fold_in(base, n).

    `base` is the batch's seed tensor, set before the layers run in the same trace.
    """

    def __init__(self):  # no variable: nothing to advance, nothing to race on
        self.base: tf.Tensor | None = None
        self._draws = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self.base, self._draws)


class Augmenter:
    """(uint8 images [B, H, W, 3], int64 labels [B], int64 seed [2]) -> the augmented
    batch: uint8 images of the same shape, and the labels as they came, or as float32
    [B, num_classes] distributions when `names` mix."""

    def __init__(self, names: Sequence[str], num_classes: int):
        self.names, self.num_classes = tuple(names), num_classes
        self._seeds = BatchSeeds()
        wanted = [name for name in self.names if name not in MIXING]
        self._layers = [_LAYERS[name]() for name in wanted]
        mixing = [name for name in self.names if name in MIXING]
        self._mixers = [_LAYERS[name]() for name in (
            ("mixup", "cutmix") if "mix" in mixing else mixing)]
        for layer in [*self._layers, *self._mixers]:
            # Bypasses Keras' attribute tracking: the layer's own generator stays tracked
            # (and unused), ours is not a variable of any model.
            object.__setattr__(layer, "generator", self._seeds)
            for inner in getattr(layer, "_AUGMENT_LAYERS", ()):  # RandAugment's own layers
                object.__setattr__(getattr(layer, inner), "generator", self._seeds)

    def __call__(self, images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor):
        self._seeds.base, self._seeds._draws = seed, 0
        x = tf.cast(images, tf.float32)
        for layer in self._layers:
            x = layer(x, training=True)
        if self._mixers:
            labels = tf.one_hot(labels, self.num_classes, dtype=tf.float32)
            x, labels = self._mix(x, labels, seed)
        return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8), labels

    def _mix(self, x, labels, seed):
        def apply(layer):
            def run():
                out = layer({"images": x, "labels": labels}, training=True)
                return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)
            return run
        if len(self._mixers) == 1:
            return apply(self._mixers[0])()
        # One of MixUp and CutMix per batch, by a coin of the batch's own seed.
        coin = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(
            seed, -1))
        return tf.cond(coin < 0.5, apply(self._mixers[0]), apply(self._mixers[1]))


def batch_seed(seed: int, batch_number: tf.Tensor) -> tf.Tensor:
    """int64 [2]: the seed of global train batch `batch_number` of a run seeded `seed`."""
    return tf.stack([tf.constant(seed, tf.int64) + 7919, tf.cast(batch_number, tf.int64)])


def _is_distribution(y_true, y_pred) -> bool:
    return len(y_true.shape) == 2 and y_true.shape[-1] == y_pred.shape[-1] and (
        y_pred.shape[-1] != 1)


@keras.saving.register_keras_serializable(package="imagebeam")
def soft_or_sparse_crossentropy(y_true, y_pred):
    """Cross-entropy of label ids [B] (or [B, 1]), or of label distributions [B, K]."""
    if _is_distribution(y_true, y_pred):
        return keras.losses.categorical_crossentropy(y_true, y_pred)
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


@keras.saving.register_keras_serializable(package="imagebeam")
class SoftOrSparseAccuracy(keras.metrics.MeanMetricWrapper):
    """Accuracy against label ids, or against the most probable label of a distribution
    (with mixed labels: the larger of the two mixed classes)."""

    def __init__(self, name: str = "accuracy", dtype=None):
        super().__init__(self._accuracy, name=name, dtype=dtype)

    @staticmethod
    def _accuracy(y_true, y_pred):
        if _is_distribution(y_true, y_pred):
            return keras.metrics.categorical_accuracy(y_true, y_pred)
        return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}

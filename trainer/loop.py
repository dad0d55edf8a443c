"""Training on several replicas: a custom loop in place of `model.fit`.

Keras 3.15's `fit` does not run under TensorFlow's multi-replica strategies:

- under MultiWorkerMirroredStrategy it averages the first distributed batch across
  replicas to learn the input shapes, and then reduces per-replica scalars along an axis
  they do not have (keras-team/keras#20585); it fails before the first step;
- under MirroredStrategy with `steps_per_execution` > 1 its multi-step function feeds
  the replicas a placeholder it never fills.

This is the loop TensorFlow's distributed-training guide prescribes instead. Per step
each replica computes its examples' losses, scaled by the *global* batch size
(`tf.nn.compute_average_loss`), and the Keras optimizer sums the replicas' gradients
before it applies them: the update of one batch of the global size. The data comes from
`strategy.distribute_datasets_from_function`: each input pipeline (one per worker) builds
its own dataset of per-replica batches over its own train shards, so workers read
disjoint data and no worker reads records it then drops.

Callbacks get the calls `fit` would make (`on_epoch_begin`, `on_train_batch_end`,
`on_epoch_end` with `loss`, `accuracy`, `val_loss`, `val_accuracy`), so the trainer's
checkpointing, preemption and summaries work unchanged.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf


def per_replica_batch(global_batch: int, num_replicas: int) -> int:
    """The batch each replica trains on; the global batch must split evenly."""
    if global_batch % num_replicas:
        raise ValueError(f"--batch_size {global_batch} is the global batch: it must be a "
                         f"multiple of the {num_replicas} replicas")
    return global_batch // num_replicas


class DistributedTrainer:
    """Trains and evaluates a compiled Keras classifier (softmax outputs, integer labels)
    under `strategy`; the model and its optimizer must have been built in its scope."""

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy, global_batch: int,
                 class_weight: dict[int, float] | None = None):
        """class_weight: {label id: weight} multiplying each train example's loss, as
        `fit(class_weight=...)` does; None: every example weighs 1."""
        self.model, self.strategy, self.global_batch = model, strategy, global_batch
        self._class_weight = None if class_weight is None else tf.constant(
            [class_weight[i] for i in range(len(class_weight))], tf.float32)
        self._loss = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        self._train_steps = tf.function(self._distributed_train_steps)
        self._eval_step = tf.function(self._local_eval_step)
        self._average_statistics = tf.function(
            lambda: self.strategy.run(self._replica_average_statistics))

    # ------------------------------------------------------------ steps

    def _replica_step(self, images: tf.Tensor, labels: tf.Tensor):
        model, optimizer = self.model, self.model.optimizer
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example = self._loss(labels, tf.cast(probabilities, tf.float32))
            if self._class_weight is not None:
                per_example *= tf.gather(self._class_weight, labels)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
            if model.losses:  # regularisation, once per replica, split among them
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            # Under mixed precision Keras wraps the optimizer in a LossScaleOptimizer,
            # whose apply_gradients unscales what scale_loss scaled.
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return _sums(per_example, probabilities, labels)

    def _distributed_train_steps(self, iterator, steps: tf.Tensor) -> tf.Tensor:
        """`steps` steps in one call (Keras' steps_per_execution); float32 [3] sums."""
        totals = tf.zeros([3])
        for _ in tf.range(steps):
            images, labels = next(iterator)
            per_replica = self.strategy.run(self._replica_step, args=(images, labels))
            totals += tf.stack([self.strategy.reduce(tf.distribute.ReduceOp.SUM, value,
                                                     axis=None) for value in per_replica])
        return totals

    def _replica_average_statistics(self) -> None:
        """Every replica's non-trainable float variables (BatchNormalization's moving mean
        and variance) set to their mean over all replicas. Keras 3 updates them on each
        replica from its own batches only, so without this each worker would evaluate,
        and the chief export, statistics of its own share of the data."""
        variables = [getattr(v, "value", v) for v in self.model.non_trainable_weights]
        variables = [v for v in variables if v.dtype.is_floating]
        if not variables:
            return
        context = tf.distribute.get_replica_context()
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                   [tf.identity(v) for v in variables])
        for variable, mean in zip(variables, means, strict=True):
            variable.assign(mean)

    def _local_eval_step(self, images: tf.Tensor, labels: tf.Tensor):
        probabilities = self.model(images, training=False)
        return _sums(self._loss(labels, tf.cast(probabilities, tf.float32)), probabilities,
                     labels)

    # ------------------------------------------------------------ loops

    def fit(self, dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset], *,
            epochs: int, initial_epoch: int, steps_per_epoch: int,
            validation: tf.data.Dataset | None, callbacks: Sequence[keras.callbacks.Callback],
            verbose: bool, steps_per_execution: int = 1) -> None:
        """`model.fit` over the endless per-replica batches `dataset_fn` makes; callbacks
        see every `steps_per_execution`-th batch, as in Keras."""
        iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
        for epoch in range(initial_epoch, epochs):
            started = time.perf_counter()
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            totals = [0.0, 0.0, 0.0]
            done = 0
            while done < steps_per_epoch:
                steps = min(steps_per_execution, steps_per_epoch - done)
                sums = self._train_steps(iterator, tf.constant(steps)).numpy()
                totals = [t + float(s) for t, s in zip(totals, sums, strict=True)]
                done += steps
                for callback in callbacks:
                    callback.on_train_batch_end(done - 1)
            logs = _metrics(totals)
            self._average_statistics()  # before validation, the checkpoint and the export
            if validation is not None:
                logs.update({f"val_{k}": v for k, v in self.evaluate(validation).items()})
            if verbose:
                print(f"Epoch {epoch + 1}/{epochs} - {time.perf_counter() - started:.0f}s - "
                      + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()),
                      file=sys.stderr, flush=True)
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs)
            if getattr(self.model, "stop_training", False):  # early stopping, as in fit
                break

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """{"loss", "accuracy"} over every batch of `dataset`, on this worker alone: the
        variables are mirrored, so each worker computes the same numbers."""
        totals = [0.0, 0.0, 0.0]
        for images, labels in dataset:
            sums = self._eval_step(images, labels)
            totals = [t + float(s) for t, s in zip(totals, sums, strict=True)]
        return _metrics(totals)


def _sums(per_example: tf.Tensor, probabilities: tf.Tensor, labels: tf.Tensor):
    """(sum of losses, correct predictions, examples) of one batch, as float32."""
    predicted = tf.argmax(probabilities, axis=-1, output_type=labels.dtype)
    correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
    count = tf.cast(tf.size(labels), tf.float32)
    return tf.reduce_sum(per_example), correct, count


def _metrics(totals: Sequence[float]) -> dict[str, float]:
    loss, correct, count = totals
    if not count:
        return {"loss": math.nan, "accuracy": math.nan}
    return {"loss": loss / count, "accuracy": correct / count}

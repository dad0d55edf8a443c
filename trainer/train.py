"""One training run: data from the manifest, fit with resumable epochs, evaluate, export.

Preemption. After every completed epoch the model, the optimizer, the epoch number
and the per-epoch history are saved together in one `tf.train.Checkpoint`
(the `checkpoint` index file is replaced atomically, so a kill at any moment leaves
the previous epoch's checkpoint intact). A rerun of the same command restores the
latest one and trains the remaining epochs on the same per-epoch data order;
metrics.json records `resumed_from_epoch`. Checkpoints made on other data or with another
model are set aside instead, and training starts fresh (`trainer/checkpoints.py`).
SIGTERM (what Vertex AI and Kubernetes send before a preemption) stops training at the
next batch boundary, without writing the unfinished epoch, and the process exits with
status 143.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from pipelines.contract.manifest import ManifestError, read_manifest
from pipelines.contract.transform_output import normalization_from_transform_output
from trainer import agreement, checkpoints, distribute, loop, quiet, serving
from trainer import augment as augment_lib
from trainer import evaluation as evaluation_lib
from trainer import input as input_lib
from trainer import report as report_lib
from trainer.config import CHECKPOINT_SECONDS, TrainConfig, UsageError
from trainer.model import (
    APPLICATIONS,
    NORMALIZATION,
    WeightsUnavailable,
    input_scaling,
    make_model,
    save_backbone_weights,
)
from trainer.schedule import Phase, PhasedSchedule, phases  # noqa: F401 (Phase: tests)

log = logging.getLogger(__name__)
_SAVED_MODEL_ENTRIES = ("saved_model.pb", "fingerprint.pb", "variables", "assets")


class Preempted(Exception):
    """SIGTERM arrived; the last completed epoch is checkpointed."""


def load_data(config: TrainConfig) -> tuple[input_lib.DataSpec, checkpoints.TrainedOn,
                                            dict[int, float] | None]:
    """The preprocess output's manifest (local or gs://) as a DataSpec, the record of
    training `config.model` on it that checkpoints must match to be resumed, and the
    class weights `config.class_weight` asks for (None: unweighted)."""
    try:
        manifest = read_manifest(config.data)
    except ManifestError as err:
        raise UsageError(f"--data: {err}") from err
    # Pretrained weights change the model's input layers: their checkpoints are another
    # model's.
    model = f"{config.model} (pretrained)" if config.pretrained else config.model
    weights = None
    if config.class_weight == "balanced":
        counts = manifest.splits["train"].class_counts
        weights = balanced_class_weights([counts.get(label, 0) for label in manifest.labels])
    return (input_lib.DataSpec.from_manifest(config.data, manifest),
            checkpoints.TrainedOn.of(config.data, manifest, model), weights)


def balanced_class_weights(counts: list[int]) -> dict[int, float]:
    """{label id: n / (classes * count)} over train label counts in label order; a label
    with no train examples gets 0 (it has no loss to weigh)."""
    total, classes = sum(counts), len(counts)
    return {i: (total / (classes * count) if count else 0.0) for i, count in enumerate(counts)}


def set_backbone_trainable(model: keras.Model, frozen: bool, unfreeze: int | None) -> None:
    """Freezes the layer named `backbone`, or unfreezes it (only its top `unfreeze`
    layers when given). The caller recompiles: Keras reads trainability at compile."""
    backbone = model.get_layer("backbone")
    backbone.trainable = not frozen
    if not frozen and unfreeze is not None:
        layers = backbone.layers
        for layer in layers[:max(len(layers) - unfreeze, 0)]:
            layer.trainable = False


def load_normalization(spec: input_lib.DataSpec) -> dict:
    """{"mean": float32 [3], "std": float32 [3], "source": str} for 0..255 pixels."""
    if spec.transform_output:
        stats = normalization_from_transform_output(spec.transform_output)
        return {"mean": stats["mean"], "std": stats["std"], "source": "transform_output"}
    pixels = input_lib.sample_images(spec).reshape(-1, 3).astype(np.float64)
    log.warning("the manifest names no transform_output: pixel mean/std estimated from %d "
                "train images", len(pixels) // (spec.height * spec.width))
    return {"mean": pixels.mean(axis=0).astype(np.float32),
            "std": pixels.std(axis=0).astype(np.float32), "source": "train sample"}


class EpochRecorder(keras.callbacks.Callback):
    """Per completed epoch: throughput, peak memory, history row, checkpoint; inside an
    epoch, a checkpoint every `checkpoint_every` steps, or every `checkpoint_seconds` of
    training when that is None (`mid_epoch` False: epoch ends only).

    Raises Preempted at the first batch boundary after `stop` is set.
    """

    def __init__(self, state: checkpoints.TrainingState, history: list[dict], steps: int,
                 global_batch: int, stop: threading.Event, *, mid_epoch: bool = False,
                 checkpoint_every: int | None = None,
                 checkpoint_seconds: float = CHECKPOINT_SECONDS):
        super().__init__()
        self._state, self._history, self._steps = state, history, steps
        self._global_batch, self._stop = global_batch, stop
        self._mid_epoch, self._every, self._seconds = mid_epoch, checkpoint_every, (
            checkpoint_seconds)

    def _global_step(self) -> int:
        return int(self._state.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self._started = self._last_batch = self._saved_at = time.perf_counter()
        self._batches = 0
        self._epoch = epoch
        if self._state is not None:
            self._first_step = self._saved_step = self._global_step()

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        self._last_batch = time.perf_counter()
        if self._stop.is_set():
            raise Preempted(f"stopped by SIGTERM in epoch {len(self._history) + 1}")
        if not self._mid_epoch:
            return
        step = self._global_step()
        in_epoch = step - self._epoch * self._steps
        due = (step - self._saved_step >= self._every if self._every
               else self._last_batch - self._saved_at >= self._seconds)
        if due and 0 < in_epoch < self._steps:
            self._state.save(self._epoch, self._history, step=in_epoch)
            self._saved_step, self._saved_at = step, time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = self._last_batch - self._started
        steps = self._global_step() - self._first_step
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
               "train_seconds": round(seconds, 3),
               "images_per_s": round(steps * self._global_batch / max(seconds, 1e-9), 1),
               "peak_rss_mb": peak_rss_mb()}
        if steps != self._steps:  # the rest of an epoch a resumed run began inside
            row["steps"] = steps
        self._history.append(row)
        self._state.save(epoch + 1, self._history)


class BestEpoch(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest val_loss (with the state, so they
    are checkpointed with it) and, with `patience`, stops training after that many epochs
    without a lower one. Runs before EpochRecorder, which saves the state."""

    def __init__(self, state: checkpoints.TrainingState, history: list[dict], patience: int):
        super().__init__()
        self._state, self._history, self._patience = state, history, patience
        self.stopped_after: int | None = None

    def best(self) -> tuple[int, float]:
        """(epoch, val_loss) of the best epoch in the history so far; (0, inf) if none."""
        return best_epoch(self._history)

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss")
        if loss is None:
            return
        best, best_loss = self.best()
        if float(loss) < best_loss:
            self._state.keep_as_best(epoch + 1)
        elif self._patience and epoch + 1 - best >= self._patience:
            self.stopped_after = epoch + 1
            # Keras' fit and trainer.loop both stop at the end of this epoch.
            self._state.model.stop_training = True


def best_epoch(history: list[dict]) -> tuple[int, float]:
    """(epoch, val_loss) of the history row with the lowest val_loss, the earliest of
    equals; (0, inf) when no row has one."""
    rows = [(row["val_loss"], row["epoch"]) for row in history if "val_loss" in row]
    if not rows:
        return 0, math.inf
    loss, epoch = min(rows)
    return epoch, loss


class EpochSummaries(keras.callbacks.Callback):
    """TensorBoard scalars per epoch, as Keras' TensorBoard callback names them
    (`train/` and `validation/` runs, `epoch_loss`, `epoch_accuracy`, ...).

    Keras' callback needs the `tensorboard` package for `tf.summary.scalar`, which
    TF 2.21 no longer installs; `tf.summary.write` with the scalars plugin's metadata
    is core TensorFlow and writes the same event files.
    """

    _METADATA = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    def __init__(self, log_dir: str, history: list[dict]):
        super().__init__()
        self._log_dir, self._history = log_dir, history
        self._writers: dict[str, tf.summary.SummaryWriter] = {}

    def on_epoch_end(self, epoch, logs=None):
        row = self._history[-1] if self._history else {}
        values = {**(logs or {}), "images_per_s": row.get("images_per_s", 0.0)}
        for key, value in values.items():
            run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            if run not in self._writers:
                self._writers[run] = tf.summary.create_file_writer(f"{self._log_dir}/{run}")
            with self._writers[run].as_default():
                tf.summary.write(f"epoch_{name}", tf.constant(float(value)), step=epoch,
                                 metadata=self._METADATA)
        for writer in self._writers.values():
            writer.flush()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextlib.contextmanager
def stop_on_sigterm():
    """Yields an Event set by SIGTERM while inside (main thread only)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(config: TrainConfig) -> dict:
    """Trains, evaluates and exports as `config` says; returns the metrics it wrote."""
    clock = {"started": time.perf_counter()}
    runtime = distribute.setup(config.mixed_precision, config.jit,
                               cpu_replicas=config.cpu_replicas)
    spec, trained_on, class_weight = load_data(config)
    norm = load_normalization(spec)
    keras.utils.set_random_seed(config.seed)
    steps = input_lib.steps_per_epoch(spec.num_examples("train"), config.batch_size)
    several_replicas = runtime.num_replicas > 1
    schedule = phases(config)
    if several_replicas:
        try:
            loop.per_replica_batch(config.batch_size, runtime.num_replicas)
        except ValueError as err:
            raise UsageError(str(err)) from err
        if len(schedule) > 1:
            raise UsageError("--freeze_epochs runs on one replica only; the several-replica "
                             "loop trains one phase")
        if augment_lib.mixes(config.augment):
            raise UsageError("--augment with mixup, cutmix or mix (strong) runs on one replica "
                             "only: the several-replica loop trains on label ids")
    spe = min(config.steps_per_execution, steps)
    with runtime.strategy.scope():
        try:
            model = make_model(config.model, (spec.height, spec.width, 3), len(spec.labels),
                               norm["mean"], norm["std"], weights=config.weights)
        except WeightsUnavailable as err:
            raise UsageError(str(err)) from err
        optimizer = keras.optimizers.Adam(PhasedSchedule(schedule, steps, config.lr_schedule,
                                                         config.warmup_epochs))
        _compile(model, optimizer, runtime.jit, spe)
        # Slots for every variable exist before a restore, also those a frozen phase skips.
        model.optimizer.build(model.trainable_variables)
    # Keras' fit does not run with several replicas (trainer.loop says why).
    trainer = (loop.DistributedTrainer(model, runtime.strategy, config.batch_size,
                                       class_weight=class_weight)
               if several_replicas else None)
    state = checkpoints.TrainingState(model, config.checkpoint_dir, runtime, trained_on,
                                      keep_best=bool(config.early_stopping))
    restored = state.restore()
    resumed_from, history = restored.epoch, restored.history
    warm_started = warm_start(model, _warm_start_source(config)) if (
        config.warm_start and not (resumed_from or restored.step)) else None
    if restored.step:
        log.warning("resuming at step %d of epoch %d of %d from %s", restored.step,
                    resumed_from + 1, config.epochs, config.checkpoint_dir)
    elif resumed_from:
        log.warning("resuming after epoch %d of %d from %s", resumed_from, config.epochs,
                    config.checkpoint_dir)
    # Mid-epoch checkpoints need batches that a resume can skip to exactly.
    mid_epoch = not several_replicas and config.cache == "none"
    best = BestEpoch(state, history, config.early_stopping)
    has = {split: spec.num_examples(split) > 0 for split in ("validation", "test")}
    if resumed_from < config.epochs:
        validation = (input_lib.eval_dataset(spec, "validation", config.batch_size)
                      if has["validation"] else None)
        with stop_on_sigterm() as stop:
            callbacks = [best, EpochRecorder(state, history, steps, config.batch_size, stop,
                                             mid_epoch=mid_epoch,
                                             checkpoint_every=config.checkpoint_every)]
            if runtime.is_chief:
                callbacks.append(EpochSummaries(config.tensorboard_dir, history))
            progress = sys.stdout.isatty() if config.progress is None else config.progress
            if trainer:
                trainer.fit(_train_input(config, spec, resumed_from), epochs=config.epochs,
                            initial_epoch=resumed_from, steps_per_epoch=steps,
                            validation=validation, callbacks=callbacks,
                            verbose=runtime.is_chief, steps_per_execution=spe)
            else:
                # The phase follows from the completed epoch, so a resumed run picks up the
                # schedule where the checkpoint left it (the learning rate follows from the
                # optimizer's step count). One fit per epoch, on exactly that epoch's
                # batches: Keras 3 rounds steps_per_epoch up to whole steps_per_execution
                # calls unless the data ends, and the data ending is what keeps epoch e
                # exactly its own records (and a resumed epoch exactly the rest of them).
                current = None
                for epoch in range(resumed_from, config.epochs):
                    if best.stopped_after:
                        break
                    phase = next(p for p in schedule if p.start <= epoch < p.end)
                    if len(schedule) > 1 and phase != current:
                        set_backbone_trainable(model, phase.frozen, config.unfreeze)
                        # The same optimizer (its slots and step count are checkpointed).
                        _compile(model, model.optimizer, runtime.jit, spe)
                        log.info("epochs %d-%d: backbone %s, peak learning rate %g", epoch + 1,
                                 phase.end, "frozen" if phase.frozen else "unfrozen"
                                 if config.unfreeze is None else
                                 f"top {config.unfreeze} layers unfrozen", phase.learning_rate)
                    current = phase
                    skip = restored.step if epoch == resumed_from else 0
                    model.fit(_train_input(config, spec, epoch, epoch + 1, skip)(None),
                              epochs=epoch + 1, initial_epoch=epoch,
                              validation_data=validation, callbacks=callbacks,
                              class_weight=class_weight,
                              shuffle=False,  # the dataset shuffles; Keras cannot shuffle
                              verbose=1 if progress else 2)
    exported_epoch = len(history)
    if config.early_stopping:
        exported_epoch = state.load_best() or exported_epoch
    clock["trained"] = time.perf_counter()
    evaluation, predictions = {}, {}
    for split in ("validation", "test"):
        if has[split]:
            dataset = input_lib.eval_dataset(spec, split, config.batch_size)
            predictions[split] = _predictions(model, dataset)
            evaluation[split] = {**_rounded(_evaluate(model, trainer, dataset)),
                                 **evaluation_lib.evaluate(*predictions[split], spec.labels)}
    clock["evaluated"] = time.perf_counter()
    _export(model, spec, config, runtime)
    if runtime.is_chief and config.model in APPLICATIONS:
        # A weights file for --weights PATH (pre-train on one set, fine-tune on another);
        # it records this run's input scaling, which a run loading it keeps.
        save_backbone_weights(model, f"{config.model_dir}/{BACKBONE_WEIGHTS}")
    clock["exported"] = time.perf_counter()
    metrics = {
        "epochs": len(history),
        "resumed_from_epoch": resumed_from,
        "resumed_from": {"epoch": resumed_from, "step": restored.step},
        "best_epoch": best_epoch(history)[0] or None,
        "exported_epoch": exported_epoch,
        "early_stopping": {"patience": config.early_stopping,
                           "stopped_after_epoch": best.stopped_after},
        "warm_started_from": warm_started,
        "labels": list(spec.labels),
        **evaluation,
        "input_images_per_s": _steady_rate(history),
        "peak_rss_mb": peak_rss_mb(),
        "model": config.model,
        "weights": config.weights,
        "backbone_weights": (f"{config.model_dir}/{BACKBONE_WEIGHTS}"
                             if config.model in APPLICATIONS else None),
        "input_scaling": ("normalization" if input_scaling(model) == NORMALIZATION
                          else f"{config.model} preprocessing"),
        "schedule": [dataclasses.asdict(p) for p in schedule],
        "lr_schedule": config.lr_schedule,
        "warmup_epochs": config.warmup_epochs,
        "augment": list(config.augment),
        "checkpoint_every": config.checkpoint_every if mid_epoch else None,
        "unfreeze": config.unfreeze,
        "class_weight": ({spec.labels[i]: round(w, 5) for i, w in class_weight.items()}
                         if class_weight else None),
        "global_batch_size": config.batch_size,
        "steps_per_epoch": steps,
        "replicas": runtime.num_replicas,
        "workers": runtime.num_workers,
        "mixed_precision": runtime.mixed_precision,
        "xla": runtime.jit,
        "normalization": {"source": norm["source"],
                          "mean": [round(float(v), 3) for v in norm["mean"]],
                          "std": [round(float(v), 3) for v in norm["std"]]},
        "data": config.data,
        "data_fingerprint": trained_on.fingerprint,
        "saved_model": config.saved_model_dir,
        "history": history,
    }
    if runtime.is_chief:
        metrics.update(_serving_agreement(model, spec, config, has))
        metrics["timings"] = _timings(clock)
        metrics["report"] = f"{config.model_dir}/{report_lib.PATH}"
        _write_report(metrics, config, spec, predictions.get("test"))
        _write_json(f"{config.model_dir}/metrics.json", metrics)
    return metrics


BACKBONE_WEIGHTS = "backbone.weights.h5"


def _timings(clock: dict[str, float]) -> dict[str, float]:
    """Seconds per stage of run(), from the clock readings taken between them."""
    now = time.perf_counter()
    return {"setup_and_train_s": round(clock["trained"] - clock["started"], 2),
            "evaluate_s": round(clock["evaluated"] - clock["trained"], 2),
            "export_s": round(clock["exported"] - clock["evaluated"], 2),
            "serving_agreement_s": round(now - clock["exported"], 2),
            "total_s": round(now - clock["started"], 2)}


def _write_report(metrics: dict, config: TrainConfig, spec: input_lib.DataSpec,
                  test: tuple[np.ndarray, np.ndarray] | None) -> None:
    """model_dir/report.html, with the most confidently wrong test images as the model
    saw them (the stored pixels, read again in evaluation order)."""
    wrong = []
    if test is not None:
        probabilities, labels = test
        picked = report_lib.confidently_wrong(probabilities, labels)
        images, start = {}, 0
        for batch, _ in input_lib.eval_dataset(spec, "test", 256) if picked else ():
            for i in picked:
                if start <= i < start + len(batch):
                    images[i] = batch[i - start].numpy()
            start += len(batch)
        wrong = [report_lib.Wrong(images[i], spec.labels[labels[i]],
                                  spec.labels[int(probabilities[i].argmax())],
                                  float(probabilities[i].max())) for i in picked]
    report_lib.write(metrics["report"], report_lib.render(metrics, dataclasses.asdict(config),
                                                          wrong))


def _serving_agreement(model: keras.Model, spec: input_lib.DataSpec, config: TrainConfig,
                       has: dict[str, bool]) -> dict:
    """`agreement.summarize` of the held-out splits: the exported signature on their
    original files against the model on their stored records (serving_agreement), the
    served predictions' metrics next to the stored ones (served), and a warning line for
    each split below agreement.THRESHOLD."""
    with quiet.native_stderr(os.environ, "TensorFlow's messages while serving was measured"):
        serve = tf.saved_model.load(config.saved_model_dir).signatures[serving.SIGNATURE]
        result = {split: agreement.measure(model, serve, spec, split, config.batch_size)
                  for split in ("validation", "test") if has[split]}
    return agreement.summarize(result)


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer, jit: bool,
             steps_per_execution: int) -> None:
    # Label ids, or label distributions when the augmentation mixes images.
    model.compile(optimizer=optimizer, loss=augment_lib.soft_or_sparse_crossentropy,
                  metrics=[augment_lib.SoftOrSparseAccuracy()], jit_compile=jit,
                  steps_per_execution=steps_per_execution)


def _train_input(config: TrainConfig, spec: input_lib.DataSpec, start_epoch: int,
                 end_epoch: int | None = None, skip_batches: int = 0):
    """A function of tf.distribute's InputContext (None: one replica) -> this input
    pipeline's endless train batches: per-replica batches of its own shards, augmented
    as --augment says. One replica: epochs start_epoch..end_epoch - 1 epoch-aligned, the
    first `skip_batches` batches of `start_epoch` skipped (a mid-epoch resume)."""
    def dataset(context: tf.distribute.InputContext | None) -> tf.data.Dataset:
        batch, worker, workers = config.batch_size, 0, 1
        if context is not None:
            batch = context.get_per_replica_batch_size(config.batch_size)
            worker, workers = context.input_pipeline_id, context.num_input_pipelines
        augment = None
        if config.augment:
            augmenter = augment_lib.Augmenter(config.augment, len(spec.labels))

            def augment(images, labels, number):
                return augmenter(images, labels, augment_lib.batch_seed(config.seed, number))
        return input_lib.train_dataset(
            spec, batch, seed=config.seed, start_epoch=start_epoch,
            shuffle_buffer_bytes=config.shuffle_buffer_bytes, cache=config.cache,
            worker_index=worker, num_workers=workers, deterministic=config.deterministic,
            epoch_aligned=context is None, skip_batches=skip_batches, augment=augment,
            epochs=None if end_epoch is None else end_epoch - start_epoch)
    return dataset


def _evaluate(model: keras.Model, trainer: loop.DistributedTrainer | None,
              dataset: tf.data.Dataset) -> dict:
    if trainer:
        return trainer.evaluate(dataset)
    return model.evaluate(dataset, return_dict=True, verbose=0)


def _predictions(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, K] probabilities, int64 [N] labels) over every batch of `dataset`,
    on this worker alone (mirrored variables: every worker computes the same)."""
    predict = tf.function(lambda images: tf.cast(model(images, training=False), tf.float32))
    probabilities, labels = [], []
    for images, batch_labels in dataset:
        probabilities.append(predict(images).numpy())
        labels.append(batch_labels.numpy())
    if not labels:
        return np.zeros((0, model.outputs[0].shape[-1]), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probabilities), np.concatenate(labels).astype(np.int64)


def warm_start(model: keras.Model, directory: str) -> str:
    """Loads the model weights (not optimizer, epoch or history) of the latest checkpoint
    in `directory` into `model`; returns that checkpoint's path. The normalisation
    constants are not weights, so the new run's statistics stay in force."""
    latest = tf.train.latest_checkpoint(directory)
    if latest is None:
        raise FileNotFoundError(f"--warm_start {directory}: no checkpoint there")
    status = tf.train.Checkpoint(model=model).restore(latest)
    status.assert_existing_objects_matched().expect_partial()  # raises on another model
    log.warning("warm start from %s", latest)
    return latest


def _warm_start_source(config: TrainConfig) -> str:
    """--warm_start, or where restore() moved this run's own checkpoints when it names
    them (a new model on new data started from the old one's weights)."""
    own = config.checkpoint_dir.rstrip("/")
    if config.warm_start != own or tf.train.latest_checkpoint(own) is not None:
        return config.warm_start
    return f"{own}/{checkpoints.PREVIOUS}"


def _rounded(values: dict) -> dict:
    return {key: round(float(value), 5) for key, value in values.items()}


def _steady_rate(history: list[dict]) -> float | None:
    """Mean images/s over epochs, leaving out the first (tracing, buffer fill) if we can."""
    rates = [row["images_per_s"] for row in history]
    steady = rates[1:] or rates
    return round(sum(steady) / len(steady), 1) if steady else None


def _export(model: keras.Model, spec: input_lib.DataSpec, config: TrainConfig,
            runtime: distribute.Runtime) -> None:
    # Every worker saves (the variables may need collectives); only the chief's copy stays,
    # the others write into a folder of their own and remove it (TensorFlow's multi-worker
    # guide).
    temporary = f"{config.model_dir}/workertemp_{runtime.worker_index}"
    path = config.saved_model_dir if runtime.is_chief else f"{temporary}/saved_model"
    for name in _SAVED_MODEL_ENTRIES:  # a rerun replaces the model, not its neighbours
        entry = f"{path}/{name}"
        if tf.io.gfile.isdir(entry):
            tf.io.gfile.rmtree(entry)
        elif tf.io.gfile.exists(entry):
            tf.io.gfile.remove(entry)
    serving.export(model, path, spec.labels, spec.height, spec.width, spec.resize,
                   spec.max_pixels, spec.image_format, spec.jpeg_quality)
    if not runtime.is_chief:
        tf.io.gfile.rmtree(temporary)


def _write_json(path: str, value: dict) -> None:
    """Writes next to `path`, then renames over it: readers never see half a file."""
    temporary = f"{path}.tmp"
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(json.dumps(value, indent=2) + "\n")
    tf.io.gfile.rename(temporary, path, overwrite=True)

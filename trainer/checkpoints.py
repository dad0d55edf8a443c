"""Checkpoints, and the data and model they belong to.

A checkpoint folder holds `tf.train.CheckpointManager`'s files (`checkpoint`, `ckpt-N.index`,
`ckpt-N.data-*`) and `data.json`, a `TrainedOn` record written before the first checkpoint.
A run resumes from the latest checkpoint only when the folder's record equals its own
`TrainedOn`. Checkpoints of other data or another model (or with no record) are moved to
`previous/`, replacing what an earlier move left there, and training starts from scratch:
without this, `pipelines.run --overwrite` on new images restored the old model, its epoch
counter and history, and trained the new images only for the epochs "left".

Two runs match when their data is the same: the record covers what describes the stored
examples (per split: shard paths, example and byte counts, class counts; the labels; the
image config; the sha256 of the image index, which names every stored image by its content
hash and its place in the shards), not the manifest's timings or where the data lies, so an
identical rerun (or the same output copied elsewhere) resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import keras
import tensorflow as tf

from pipelines.contract.manifest import Manifest
from trainer import distribute

log = logging.getLogger(__name__)
RECORD = "data.json"
PREVIOUS = "previous"
# What CheckpointManager writes into a folder; set aside, never anything else.
_OURS = ("checkpoint", "ckpt-*", RECORD)
_READ_CHUNK = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """What a folder's checkpoints were trained on; equal records may resume each other."""

    model: str  # the trainer's --model
    labels: tuple[str, ...]  # index = label id
    image: str  # "HEIGHTxWIDTH format resize", as stored
    splits: str  # sha256 of the manifest's splits (shards, counts, class counts)
    images: str  # sha256 of the image index (content hash and place of every image); "" if none
    data: str = dataclasses.field(default="", compare=False)  # where it lay (for people)

    @classmethod
    def of(cls, data: str, manifest: Manifest, model: str) -> TrainedOn:
        """The record of training `model` on the preprocess output at `data` (its manifest
        already read); reads the output's image index (a few hundred bytes per image)."""
        image = manifest.image
        index = manifest.index_path
        return cls(
            model=model,
            labels=manifest.labels,
            image=f"{image.height}x{image.width} {image.format} {image.resize}",
            splits=_sha256_json(manifest.to_json()["splits"]),
            images=_sha256_file(f"{data.rstrip('/')}/{index}") if index else "",
            data=data,
        )

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the compared fields."""
        fields = dataclasses.asdict(self)
        fields.pop("data")
        return _sha256_json(fields)

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, **dataclasses.asdict(self),
                "labels": list(self.labels)}

    @classmethod
    def from_json(cls, value: dict) -> TrainedOn:
        """Raises KeyError, TypeError or ValueError for a record that is not one."""
        names = [field.name for field in dataclasses.fields(cls)]
        record = cls(**{name: value[name] for name in names if name in value})
        return dataclasses.replace(record, labels=tuple(record.labels))

    def differences(self, other: TrainedOn) -> list[str]:
        """What differs from `other`, e.g. ["model small_cnn -> linear", "images"]."""
        changed = []
        for field in dataclasses.fields(self):
            ours, theirs = getattr(self, field.name), getattr(other, field.name)
            if not field.compare or ours == theirs:
                continue
            if field.name in ("model", "image"):
                changed.append(f"{field.name} {theirs} -> {ours}")
            elif field.name == "labels":
                changed.append(f"labels {len(theirs)} -> {len(ours)}" if len(ours) != len(
                    theirs) else "labels")
            else:
                changed.append(field.name)
        return changed


def _sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _sha256_file(path: str) -> str:
    if not tf.io.gfile.exists(path):
        return ""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(directory: str) -> TrainedOn | None:
    """The folder's record; None if it has none or it cannot be read."""
    path = f"{directory}/{RECORD}"
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as handle:
            return TrainedOn.from_json(json.loads(handle.read()))
    except (KeyError, TypeError, ValueError):
        return None


def write_record(directory: str, trained_on: TrainedOn) -> None:
    """Writes `data.json` next to its final name, then renames it into place."""
    tf.io.gfile.makedirs(directory)
    temporary = f"{directory}/{RECORD}.tmp"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(json.dumps(trained_on.to_json(), indent=2) + "\n")
    tf.io.gfile.rename(temporary, f"{directory}/{RECORD}", overwrite=True)


def set_aside(directory: str) -> str:
    """Moves the checkpoint files and record of `directory` into `directory/previous/`
    (whose own such files go first); returns that folder. The `checkpoint` index moves
    first, so a reader never finds it pointing at a moved checkpoint."""
    previous = f"{directory}/{PREVIOUS}"
    for path in _our_files(previous):
        tf.io.gfile.remove(path)
    tf.io.gfile.makedirs(previous)
    for path in _our_files(directory):
        tf.io.gfile.rename(path, f"{previous}/{path.rsplit('/', 1)[1]}", overwrite=True)
    return previous


def _our_files(directory: str) -> list[str]:
    """Our files in `directory` (not below it), the `checkpoint` index first."""
    found = []
    for pattern in _OURS:
        found.extend(sorted(path for path in tf.io.gfile.glob(f"{directory}/{pattern}")
                            if not tf.io.gfile.isdir(path)))
    return found


@dataclasses.dataclass(frozen=True)
class Restored:
    """Where a run resumes: `epoch` epochs completed and `step` train steps of the next
    (0 at an epoch end), their history, and the epoch whose weights `best` holds (0: none)."""

    epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    best_epoch: int = 0


class TrainingState:
    """Model, optimizer, completed epochs, steps into the next epoch, history and (with
    `keep_best`) a copy of the best epoch's weights, in one checkpoint, resumed only on
    the data and model it was made with.

    Checkpoints are numbered by the optimizer's step count, so epoch ends and mid-epoch
    checkpoints sort in the order they were made. The best weights live in the same
    checkpoint as the rest, so a kill can never leave them out of step with the history
    that says which epoch they are.
    """

    def __init__(self, model: keras.Model, directory: str, runtime: distribute.Runtime,
                 trained_on: TrainedOn, keep_best: bool = False):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.history = tf.Variable("[]", dtype=tf.string, trainable=False)
        self.model = model
        self.best: list[tf.Variable] = []
        if keep_best:
            with runtime.strategy.scope():
                self.best = [tf.Variable(tf.identity(getattr(w, "value", w)), trainable=False)
                             for w in model.weights]
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              epoch=self.epoch, step=self.step,
                                              history=self.history,
                                              best_epoch=self.best_epoch, best=self.best)
        self.directory = directory.rstrip("/")
        self.trained_on = trained_on
        # Every worker saves (variables may need collectives); only the chief's copy stays.
        self._write_dir = self.directory if runtime.is_chief else (
            f"{self.directory}/workertemp_{runtime.worker_index}")
        # Made at the first save: a manager lists the folder's checkpoints when it is made
        # (to delete old ones), and restore() may have moved them away by then.
        self._manager: tf.train.CheckpointManager | None = None
        self._is_chief = runtime.is_chief

    def restore(self) -> Restored:
        """Where the latest checkpoint left off, or Restored() when there is none or it
        was trained on other data or another model: then the chief sets those
        checkpoints aside (one log line says so) and records `trained_on`."""
        latest = tf.train.latest_checkpoint(self.directory)
        recorded = read_record(self.directory)
        if latest is not None and recorded == self.trained_on:
            try:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as err:
                raise RuntimeError(f"{latest} does not fit this model ({err}); "
                                   "use a fresh --model_dir or the same flags as before") from err
            best = int(self.best_epoch.numpy()) if self.best else 0
            return Restored(int(self.epoch.numpy()), int(self.step.numpy()),
                            json.loads(self.history.numpy().decode()), best)
        if latest is not None:
            why = ", ".join(self.trained_on.differences(recorded)) if recorded else (
                "no readable data.json")
            where = f"; they are now in {self.directory}/{PREVIOUS}" if self._is_chief else ""
            if self._is_chief:
                set_aside(self.directory)
            log.warning("checkpoints in %s were made on other data or another model "
                        "(differs: %s); starting fresh%s", self.directory, why, where)
        if self._is_chief and read_record(self.directory) != self.trained_on:
            write_record(self.directory, self.trained_on)
        return Restored()

    def keep_as_best(self, epoch: int) -> None:
        """Copies the model's weights as those of `epoch` (saved with the next save);
        records only the epoch when made without `keep_best`."""
        for kept, weight in zip(self.best, self.model.weights if self.best else (),
                                strict=True):
            kept.assign(getattr(weight, "value", weight))
        self.best_epoch.assign(epoch)

    def load_best(self) -> int:
        """Sets the model's weights to the best epoch's; returns that epoch (0: none kept)."""
        epoch = int(self.best_epoch.numpy()) if self.best else 0
        if epoch:
            for kept, weight in zip(self.best, self.model.weights, strict=True):
                weight.assign(kept)
        return epoch

    def save(self, epochs_done: int, history: list[dict], step: int = 0) -> None:
        """Checkpoints `epochs_done` completed epochs and `step` steps of the next."""
        self.epoch.assign(epochs_done)
        self.step.assign(step)
        self.history.assign(json.dumps(history))
        if self._manager is None:
            self._manager = tf.train.CheckpointManager(self.checkpoint, self._write_dir,
                                                       max_to_keep=2)
        self._manager.save(checkpoint_number=int(self.model.optimizer.iterations.numpy()))
        if not self._is_chief:
            tf.io.gfile.rmtree(self._write_dir)

"""The SavedModel side of batch prediction: which model, its labels, one batch through
`serving_default`, and the RunInference ModelHandler around it.

    serving_default(image_bytes: string [N]) -> probabilities float32 [N, C],
                                                class_id int64 [N], label string [N]

The serving graph refuses a file from its header (not_an_image, too_many_pixels,
too_many_scans) by failing the whole call with an InvalidArgumentError naming the
reason; `predict_batch` then calls the batch's files one by one, so one bad file costs
one dead letter, not its batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler

from pipelines.contract.errors import UsageError
from pipelines.prediction.options import TOP_K
from pipelines.prediction.records import DeadLetter, ImageFile, Prediction

SIGNATURE = "serving_default"
INPUT = "image_bytes"
CURRENT = "current.json"  # a retraining root's pointer to the serving model
UNDECODABLE = "undecodable"
_REASON = re.compile(r"assertion failed: \[([a-z_]+)\]")

Outcome = Prediction | DeadLetter


def resolve_model(model: str) -> str:
    """The SavedModel folder `model` names: itself, or the `saved_model` of a retraining
    root's current.json (the file, or the root holding it). Raises UsageError."""
    pointer = model if model.endswith(".json") else None
    if pointer is None and FileSystems.exists(FileSystems.join(model, CURRENT)) and not (
            FileSystems.exists(FileSystems.join(model, "saved_model.pb"))):
        pointer = FileSystems.join(model, CURRENT)
    if pointer is not None:
        try:
            with FileSystems.open(pointer, compression_type="uncompressed") as handle:
                model = json.loads(handle.read())["saved_model"]
        except Exception as err:  # noqa: BLE001 - missing, unreadable, not JSON, no key
            raise UsageError(f"--model {pointer}: not a readable current.json with a "
                             f"saved_model ({err})") from err
    if not FileSystems.exists(FileSystems.join(model, "saved_model.pb")):
        raise UsageError(f"--model: no SavedModel at {model} (saved_model.pb missing)")
    return model


def saved_by(saved_model: str) -> str | None:
    """The TensorFlow version that wrote the SavedModel ('2.21.0'), from saved_model.pb;
    None if it does not say."""
    from tensorflow.core.protobuf import saved_model_pb2

    with FileSystems.open(FileSystems.join(saved_model, "saved_model.pb"),
                          compression_type="uncompressed") as handle:
        proto = saved_model_pb2.SavedModel.FromString(handle.read())
    versions = {graph.meta_info_def.tensorflow_version for graph in proto.meta_graphs}
    return max(versions - {""}, default=None)


def load_signature(saved_model: str):
    """(the loaded object, which must stay alive, and its `serving_default`)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)
    if SIGNATURE not in loaded.signatures:
        raise UsageError(f"--model {saved_model} has no {SIGNATURE} signature")
    return loaded, loaded.signatures[SIGNATURE]


def model_labels(signature) -> tuple[str, ...]:
    """The model's labels in class-id order: the string vocabulary the serving function
    captured (`trainer.serving` gathers `label` from it), one entry per probability."""
    classes = signature.structured_outputs["probabilities"].shape[-1]
    for captured in signature.captured_inputs:
        if captured.dtype.name == "string" and captured.shape.as_list() == [classes]:
            return tuple(v.decode() for v in captured.numpy())
    raise UsageError(f"the model's {SIGNATURE} does not carry its {classes} labels")


def refusal_reason(message: str) -> str:
    """The dead-letter reason in a serving-graph error: the guard's name, else undecodable."""
    found = _REASON.search(message)
    return found.group(1) if found else UNDECODABLE


def predict_batch(serve: Callable, files: Sequence[ImageFile],
                  labels: Sequence[str]) -> list[Outcome]:
    """One Prediction or DeadLetter per file, in order. `serve` is `serving_default`;
    a batch it refuses is retried file by file."""
    import tensorflow as tf

    if not files:
        return []
    try:
        outputs = serve(**{INPUT: tf.constant([f.data for f in files])})
    except tf.errors.InvalidArgumentError as err:
        if len(files) > 1:
            return [outcome for f in files for outcome in predict_batch(serve, [f], labels)]
        message = str(err.message)
        return [DeadLetter(files[0].uri, refusal_reason(message), message[:500])]
    probabilities = outputs["probabilities"].numpy()
    class_ids = outputs["class_id"].numpy()
    names = outputs["label"].numpy()
    return [_prediction(f, probabilities[i], int(class_ids[i]), names[i].decode(), labels)
            for i, f in enumerate(files)]


def _prediction(file: ImageFile, probabilities: np.ndarray, class_id: int, label: str,
                labels: Sequence[str]) -> Prediction:
    k = min(TOP_K, len(labels))
    # Stable: equal probabilities keep class-id order.
    order = np.argsort(-probabilities, kind="stable")[:k]
    return Prediction(
        uri=file.uri, sha256=file.sha256, true_labels=file.labels, label=label,
        class_id=class_id, probability=float(probabilities[class_id]),
        top_k=tuple((labels[i], float(probabilities[i])) for i in order))


class LoadedModel:
    """The loaded SavedModel and its signature (a class: Beam's shared handle keeps a
    weak reference to what it loads)."""

    def __init__(self, saved_model: str):
        self.loaded, self.serve = load_signature(saved_model)


class ImageBytesModelHandler(ModelHandler[ImageFile, Outcome, LoadedModel]):
    """RunInference's handler: loads the SavedModel once per worker process (RunInference
    keeps it in a shared handle that the process's threads use together) and runs
    batches of raw file bytes through `serving_default`."""

    def __init__(self, saved_model: str, labels: Sequence[str], batch_size: int):
        # min = max: every batch is full but a bundle's last; the model's cost per call
        # is mostly fixed, so adaptive small batches would only slow it.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._saved_model = saved_model
        self._labels = tuple(labels)

    def load_model(self) -> LoadedModel:
        return LoadedModel(self._saved_model)

    def run_inference(self, batch: Sequence[ImageFile], model: LoadedModel,
                      inference_args: dict | None = None) -> Iterable[Outcome]:
        return predict_batch(model.serve, batch, self._labels)

    def get_num_bytes(self, batch: Sequence[ImageFile]) -> int:
        return sum(len(f.data) for f in batch)

    def get_metrics_namespace(self) -> str:
        return "predict"

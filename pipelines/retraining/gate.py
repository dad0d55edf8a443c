"""The promotion gate: evaluate candidate and current model on one test set, decide.

Both models are evaluated through their exported `serving_default` signature (raw image
bytes in, `probabilities` / `label` out; `trainer/serving.py`), on the new run's test
split: each record's original source file where it is still there unchanged (what serving
answers in production, as metrics.json's `served`), else the stored image. Splits are
salted content hashes, so an image that was test in an earlier run is test now: the
current model has never trained on any of them.

The decision (`decide`) is a pure function of the two evaluations, the drift anomalies
and a `GateRule`; TensorFlow is imported only by the evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

from pipelines.contract.manifest import Manifest

# What the gate may compare, and which way. macro_recall: the mean over the test set's
# classes of each class's recall, so a small class counts as much as a big one.
METRICS = {"accuracy": "higher", "loss": "lower", "macro_recall": "higher"}
DRIFT_BLOCKING = {"error": ("error",), "warning": ("error", "warning"), "none": ()}
_BATCH = 64  # images per call of the serving signature
_MIN_PROBABILITY = 1e-7  # cross-entropy of a label the model does not know is finite


@dataclasses.dataclass(frozen=True)
class GateRule:
    """When a candidate replaces the current model.

    metric: "accuracy" or "macro_recall" (higher is better) or "loss" (cross-entropy,
      lower is better).
    margin: how much worse than the current model the candidate may be, in the metric's
      units (accuracy 0.02 = two points); negative = it must be better by that much.
    max_class_drop: None, or how far any one class's recall may fall below the current
      model's recall of that class (0.1 = ten points): an average can hide one class
      that got much worse.
    block_on_drift: anomaly severities that stop a promotion: "error" (a class the model
      knows has vanished), "warning" (any anomaly) or "none".
    """

    metric: str = "accuracy"
    margin: float = 0.02
    block_on_drift: str = "error"
    max_class_drop: float | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"gate metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.max_class_drop is not None and not 0 <= self.max_class_drop <= 1:
            raise ValueError(f"max_class_drop must be between 0 and 1, got {self.max_class_drop}")
        if self.block_on_drift not in DRIFT_BLOCKING:
            raise ValueError(f"block_on_drift must be one of {sorted(DRIFT_BLOCKING)}, "
                             f"got {self.block_on_drift!r}")


@dataclasses.dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def blocking_anomalies(anomalies: Sequence[dict], rule: GateRule) -> list[dict]:
    """The drift anomalies (stats/anomalies.json rows) whose severity blocks promotion."""
    severities = DRIFT_BLOCKING[rule.block_on_drift]
    return [a for a in anomalies if a.get("severity") in severities]


def decide(
    candidate: dict,
    baseline: dict | None,
    blocking: Sequence[dict],
    rule: GateRule,
) -> Decision:
    """Promote or not, and why.

    candidate, baseline: `evaluate` results ({num_examples, accuracy, loss, macro_recall,
    recall}) of the new model and the current one on the same images; baseline None = no
    current model.
    blocking: `blocking_anomalies` of this run's drift.
    """
    if blocking:
        kinds = ", ".join(sorted({a["kind"] for a in blocking}))
        return Decision(False, f"drift blocks promotion ({kinds}; block_on_drift="
                               f"{rule.block_on_drift})")
    if baseline is None:
        return Decision(True, "no current model: the first model is promoted")
    if not candidate.get("num_examples"):
        return Decision(False, "the test split is empty: nothing to compare the models on")
    new, old = candidate[rule.metric], baseline[rule.metric]
    if METRICS[rule.metric] == "higher":
        bound, passed, relation = old - rule.margin, new >= old - rule.margin, ">="
    else:
        bound, passed, relation = old + rule.margin, new <= old + rule.margin, "<="
    verdict = "passes" if passed else "fails"
    reason = (f"candidate {rule.metric} {new:.4f} {verdict} {relation} {bound:.4f} (current "
              f"{old:.4f}, margin {rule.margin:g}) on {candidate['num_examples']} test images")
    if passed and rule.max_class_drop is not None:
        drops = class_drops(candidate["recall"], baseline["recall"], rule.max_class_drop)
        if drops:
            worst = ", ".join(f"{label} {old_r:.3f} -> {new_r:.3f}"
                              for label, old_r, new_r in drops)
            return Decision(False, f"{reason}; but class recall fell more than "
                                   f"{rule.max_class_drop:g} (max_class_drop): {worst}")
        reason += f"; no class recall fell more than {rule.max_class_drop:g}"
    return Decision(passed, reason)


def class_drops(candidate: dict[str, float], baseline: dict[str, float],
                max_drop: float) -> list[tuple[str, float, float]]:
    """(label, current recall, candidate recall) of each class whose recall fell more
    than `max_drop`, largest fall first; classes either model lacks are compared as 0."""
    falls = [(label, baseline[label], candidate.get(label, 0.0)) for label in baseline]
    # A hair of tolerance: recalls are rounded to 5 places.
    return sorted((row for row in falls if row[1] - row[2] > max_drop + 1e-9),
                  key=lambda row: row[2] - row[1])


def split_examples(data_root: str, manifest: Manifest, split: str = "test") -> Iterator[
        tuple[list[bytes], list[str]]]:
    """Batches of (encoded image files, true label) from a preprocess output's split.

    The file is the record's first source file when it still holds the bytes that were
    preprocessed (sha256), else the stored image (`raw` pixels encoded as PNG, since the
    serving signature takes image files). The true label is the record's first label
    (what the trainer trains on).
    """
    import hashlib

    import tensorflow as tf

    from pipelines.contract import records

    labels = list(manifest.labels)
    height, width = manifest.image.size
    paths = [f"{data_root.rstrip('/')}/{path}" for path in manifest.shard_paths(split)]
    if not paths:
        return
    spec = {key: records.FEATURE_SPEC[key] for key in (records.ENCODED, records.FORMAT,
                                                       records.LABEL, records.SOURCE_ID,
                                                       records.SHA256)}
    dataset = tf.data.TFRecordDataset(paths).batch(_BATCH).map(
        lambda serialized: tf.io.parse_example(serialized, spec))
    for batch in dataset:
        ids = tf.sparse.to_dense(batch[records.LABEL], default_value=-1).numpy()
        sources = tf.sparse.to_dense(batch[records.SOURCE_ID], default_value=b"").numpy()
        images = []
        for encoded, image_format, source, sha256 in zip(
                batch[records.ENCODED].numpy(), batch[records.FORMAT].numpy(), sources[:, 0],
                batch[records.SHA256].numpy(), strict=True):
            original = _read(source.decode()) if source else None
            if original is not None and hashlib.sha256(original).hexdigest() == sha256.decode():
                encoded = original
            elif image_format == b"raw":
                pixels = tf.reshape(tf.io.decode_raw(encoded, tf.uint8), [height, width, 3])
                encoded = tf.io.encode_png(pixels).numpy()
            images.append(encoded)
        yield images, [labels[row[0]] if len(row) and row[0] >= 0 else "" for row in ids]


def _read(uri: str) -> bytes | None:
    """The file at `uri`, None if it is gone or unreadable."""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(uri, "rb") as handle:
            return handle.read()
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError):
        return None


def evaluate(saved_model: str, model_labels: Sequence[str],
             batches: Sequence[tuple[list[bytes], list[str]]]) -> dict:
    """{num_examples, accuracy, loss, macro_recall, recall: {true label: recall}} of the
    SavedModel at `saved_model` on `batches`.

    model_labels: the model's label vocabulary (its metrics.json `labels`), the order of
    its `probabilities`. A true label the model does not know counts as wrong, with
    cross-entropy -log(1e-7), so models with different label sets compare fairly.
    """
    import numpy as np
    import tensorflow as tf

    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    index = {label: i for i, label in enumerate(model_labels)}
    correct, losses = 0, []
    hits: dict[str, list[int]] = {}  # true label -> [right, examples]
    for images, truth in batches:
        outputs = serve(image_bytes=tf.constant(images))
        predicted = [label.decode() for label in outputs["label"].numpy()]
        probabilities = outputs["probabilities"].numpy()
        correct += sum(p == t for p, t in zip(predicted, truth, strict=True))
        for p, t in zip(predicted, truth, strict=True):
            tally = hits.setdefault(t, [0, 0])
            tally[0] += p == t
            tally[1] += 1
        for row, label in zip(probabilities, truth, strict=True):
            p = float(row[index[label]]) if label in index else 0.0
            losses.append(-math.log(max(p, _MIN_PROBABILITY)))
    count = len(losses)
    return {
        "num_examples": count,
        "accuracy": round(correct / count, 5) if count else None,
        "loss": round(float(np.mean(losses)), 5) if count else None,
        **recalls(hits),
    }


def recalls(hits: dict[str, list[int]]) -> dict:
    """{"macro_recall": mean recall over the true labels seen (None if none), "recall":
    {label: right / examples}} from {true label: [right, examples]}."""
    recall = {label: round(right / total, 5) for label, (right, total) in sorted(hits.items())}
    return {"macro_recall": round(sum(recall.values()) / len(recall), 5) if recall else None,
            "recall": recall}

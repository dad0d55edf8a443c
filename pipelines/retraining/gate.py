"""The promotion gate: evaluate candidate and current model on one test set, decide.

Both models are evaluated through their exported `serving_default` signature (raw image
bytes in, `probabilities` / `label` out; `trainer/serving.py`), on the stored images of
the new run's test split. Splits are salted content hashes, so an image that was test
in an earlier run is test now: the current model has never trained on any of them.

The decision (`decide`) is a pure function of the two evaluations, the drift anomalies
and a `GateRule`; TensorFlow is imported only by the evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

from pipelines.contract.manifest import Manifest

METRICS = {"accuracy": "higher", "loss": "lower"}  # what the gate may compare, and which way
DRIFT_BLOCKING = {"error": ("error",), "warning": ("error", "warning"), "none": ()}
_BATCH = 64  # images per call of the serving signature
_MIN_PROBABILITY = 1e-7  # cross-entropy of a label the model does not know is finite


@dataclasses.dataclass(frozen=True)
class GateRule:
    """When a candidate replaces the current model.

    metric: "accuracy" (higher is better) or "loss" (cross-entropy, lower is better).
    margin: how much worse than the current model the candidate may be, in the metric's
      units (accuracy 0.02 = two points); negative = it must be better by that much.
    block_on_drift: anomaly severities that stop a promotion: "error" (a class the model
      knows has vanished), "warning" (any anomaly) or "none".
    """

    metric: str = "accuracy"
    margin: float = 0.02
    block_on_drift: str = "error"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"gate metric must be one of {sorted(METRICS)}, got {self.metric!r}")
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

    candidate, baseline: `evaluate` results ({num_examples, accuracy, loss}) of the new
    model and the current one on the same images; baseline None = no current model.
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
    return Decision(passed, f"candidate {rule.metric} {new:.4f} {verdict} {relation} "
                            f"{bound:.4f} (current {old:.4f}, margin {rule.margin:g}) on "
                            f"{candidate['num_examples']} test images")


def split_examples(data_root: str, manifest: Manifest, split: str = "test") -> Iterator[
        tuple[list[bytes], list[str]]]:
    """Batches of (encoded image files, true label) from a preprocess output's split.

    The true label is the record's first label (what the trainer trains on). Stored
    `raw` pixels are encoded as PNG, since the serving signature takes image files.
    """
    import tensorflow as tf

    from pipelines.contract import records

    labels = list(manifest.labels)
    height, width = manifest.image.size
    paths = [f"{data_root.rstrip('/')}/{path}" for path in manifest.shard_paths(split)]
    if not paths:
        return
    spec = {key: records.FEATURE_SPEC[key] for key in (records.ENCODED, records.FORMAT,
                                                       records.LABEL)}
    dataset = tf.data.TFRecordDataset(paths).batch(_BATCH).map(
        lambda serialized: tf.io.parse_example(serialized, spec))
    for batch in dataset:
        ids = tf.sparse.to_dense(batch[records.LABEL], default_value=-1).numpy()
        images = []
        for encoded, image_format in zip(batch[records.ENCODED].numpy(),
                                         batch[records.FORMAT].numpy(), strict=True):
            if image_format == b"raw":
                pixels = tf.reshape(tf.io.decode_raw(encoded, tf.uint8), [height, width, 3])
                encoded = tf.io.encode_png(pixels).numpy()
            images.append(encoded)
        yield images, [labels[row[0]] if len(row) and row[0] >= 0 else "" for row in ids]


def evaluate(saved_model: str, model_labels: Sequence[str],
             batches: Sequence[tuple[list[bytes], list[str]]]) -> dict:
    """{num_examples, accuracy, loss} of the SavedModel at `saved_model` on `batches`.

    model_labels: the model's label vocabulary (its metrics.json `labels`), the order of
    its `probabilities`. A true label the model does not know counts as wrong, with
    cross-entropy -log(1e-7), so models with different label sets compare fairly.
    """
    import numpy as np
    import tensorflow as tf

    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    index = {label: i for i, label in enumerate(model_labels)}
    correct, losses = 0, []
    for images, truth in batches:
        outputs = serve(image_bytes=tf.constant(images))
        predicted = [label.decode() for label in outputs["label"].numpy()]
        probabilities = outputs["probabilities"].numpy()
        correct += sum(p == t for p, t in zip(predicted, truth, strict=True))
        for row, label in zip(probabilities, truth, strict=True):
            p = float(row[index[label]]) if label in index else 0.0
            losses.append(-math.log(max(p, _MIN_PROBABILITY)))
    count = len(losses)
    return {
        "num_examples": count,
        "accuracy": round(correct / count, 5) if count else None,
        "loss": round(float(np.mean(losses)), 5) if count else None,
    }

"""Does serving answer what training measured? The exported signature on the original
source files against the model on the stored records, image by image.

The trainer's validation and test metrics are computed on the stored records (the
resized, re-encoded pixels in the shards). A user's serving traffic is original files
decoded by the serving graph. Where the two differ (lossy storage, resize or decode
differences), predictions near a decision boundary flip, and the stored-record metrics
stop being what serving delivers. `measure` says how often, and evaluates the served
predictions themselves: `summarize` puts those next to the stored-record metrics in
metrics.json (`served`), the numbers a user's traffic gets.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

from pipelines.contract import records
from trainer import evaluation as evaluation_lib
from trainer import input as input_lib

log = logging.getLogger(__name__)
THRESHOLD = 0.99  # below it the summary and metrics.json carry a warning
_MIN_PROBABILITY = 1e-7  # as the retraining gate: the cross-entropy stays finite
_PARSE = {key: records.FEATURE_SPEC[key]
          for key in (records.ENCODED, records.LABEL, records.SOURCE_ID)}


def measure(model: keras.Model, serve, spec: input_lib.DataSpec, split: str,
            batch_size: int = 64) -> dict:
    """{"agreement", "num_examples", "num_disagreements", "accuracy_on_stored",
    "accuracy_on_originals", "unreadable", "disagreements", "served"} for `split`: the
    model on each stored record against `serve` (the SavedModel's serving function) on
    the record's first source file.
    Records whose source cannot be read any more are counted in `unreadable`, not
    compared. `disagreements` lists up to 20 source uris whose predictions differ.
    `served`: the served predictions evaluated as the trainer evaluates a split
    (num_examples, accuracy, loss and `trainer.evaluation.evaluate`'s metrics), None
    when `serve` returns no `probabilities` or nothing could be read."""
    stored, originals, probabilities, labels, uris = [], [], [], [], []

    @tf.function
    def predict_stored(encoded):  # traced: the parallel decode, as in training's input
        images = input_lib.decode_stored(encoded, spec.image_format, spec.height, spec.width)
        return tf.argmax(model(images, training=False), axis=-1)

    dataset = tf.data.TFRecordDataset([s.path for s in spec.splits.get(split, ())])
    for batch in dataset.batch(batch_size):
        parsed = tf.io.parse_example(batch, _PARSE)
        sources = tf.sparse.to_dense(parsed[records.SOURCE_ID], default_value=b"").numpy()
        ids = tf.sparse.to_dense(parsed[records.LABEL], default_value=-1).numpy()
        readable = [_read(row[0].decode()) for row in sources]
        keep = [i for i, data in enumerate(readable) if data is not None]
        if not keep:
            uris.extend([None] * len(sources))
            continue
        stored.append(predict_stored(tf.gather(parsed[records.ENCODED], keep)).numpy())
        outputs = serve(image_bytes=tf.constant([readable[i] for i in keep]))
        originals.append(outputs["class_id"].numpy())
        if "probabilities" in outputs:
            probabilities.append(outputs["probabilities"].numpy())
        labels.append(ids[keep, 0])
        uris.extend(sources[i][0].decode() if i in keep else None for i in range(len(sources)))
    compared = [u for u in uris if u is not None]
    unreadable = len(uris) - len(compared)
    if not stored:
        return {"agreement": None, "num_examples": 0, "num_disagreements": 0,
                "unreadable": unreadable,
                "accuracy_on_stored": None, "accuracy_on_originals": None,
                "disagreements": [], "served": None}
    stored_ids, original_ids = np.concatenate(stored), np.concatenate(originals)
    truth = np.concatenate(labels)
    differ = np.flatnonzero(stored_ids != original_ids)
    return {
        "agreement": round(float(np.mean(stored_ids == original_ids)), 5),
        "num_examples": int(len(truth)),
        "num_disagreements": int(len(differ)),
        "unreadable": unreadable,
        "accuracy_on_stored": round(float(np.mean(stored_ids == truth)), 5),
        "accuracy_on_originals": round(float(np.mean(original_ids == truth)), 5),
        "disagreements": [compared[i] for i in differ[:20]],
        "served": (_evaluate(np.concatenate(probabilities), truth, spec.labels)
                   if probabilities else None),
    }


def _evaluate(probabilities: np.ndarray, truth: np.ndarray, names: tuple[str, ...]) -> dict:
    """The trainer's split metrics (accuracy, loss, evaluation.evaluate) of served
    probabilities float [N, K] against labels int [N]."""
    picked = probabilities[np.arange(len(truth)), truth]
    return {"num_examples": int(len(truth)),
            "accuracy": round(float(np.mean(probabilities.argmax(axis=1) == truth)), 5),
            "loss": round(float(np.mean(-np.log(np.maximum(picked, _MIN_PROBABILITY)))), 5),
            **evaluation_lib.evaluate(probabilities, truth, names)}


def summarize(results: dict[str, dict]) -> dict:
    """metrics.json's part from `measure` per split: {"serving_agreement": {split:
    agreement}, "served": {split: the served metrics}, "warnings": [...]}. The split
    metrics at the top level of metrics.json are the stored records' (what training
    measured); `served` are the same metrics through the serving signature on the
    original files (what serving answers)."""
    return {"serving_agreement": {split: {k: v for k, v in result.items() if k != "served"}
                                  for split, result in results.items()},
            "served": {split: result["served"] for split, result in results.items()
                       if result.get("served")},
            "warnings": warnings_for(results)}


def warnings_for(agreement: dict[str, dict]) -> list[str]:
    """One line per split whose agreement is below THRESHOLD."""
    return [f"serving agreement on {split} is {result['agreement']:.3f} (below "
            f"{THRESHOLD}): serving the original files answers differently from the stored "
            f"records on {result['num_disagreements']} of {result['num_examples']} images; "
            f"stored-record accuracy "
            f"{result['accuracy_on_stored']}, on originals {result['accuracy_on_originals']}"
            for split, result in agreement.items()
            if result["agreement"] is not None and result["agreement"] < THRESHOLD]


def _read(uri: str) -> bytes | None:
    try:
        with tf.io.gfile.GFile(uri, "rb") as handle:
            return handle.read()
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError):
        return None

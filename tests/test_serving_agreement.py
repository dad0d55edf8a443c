"""The exported signature on the original files against the model on the stored records."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.contract import records
from pipelines.contract.manifest import read_manifest
from pipelines.retraining import gate
from trainer import agreement, serving
from trainer import input as input_lib
from trainer.model import make_model


@pytest.fixture(scope="module")
def exported(photo_prep, tmp_path_factory):
    spec = input_lib.DataSpec.from_manifest(str(photo_prep.output),
                                            read_manifest(str(photo_prep.output)))
    keras.utils.set_random_seed(0)
    model = make_model("small_cnn", (spec.height, spec.width, 3), len(spec.labels),
                       np.full(3, 127.0), np.full(3, 60.0))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(input_lib.train_dataset(spec, 16), steps_per_epoch=20, epochs=1, verbose=0)
    path = str(tmp_path_factory.mktemp("served") / "saved_model")
    serving.export(model, path, spec.labels, spec.height, spec.width, spec.resize,
                   stored_as=spec.image_format, jpeg_quality=spec.jpeg_quality)
    serve = tf.saved_model.load(path).signatures[serving.SIGNATURE]
    return spec, model, serve, path


def test_agreement_compares_every_record_and_recounts(exported):
    spec, model, serve, _ = exported
    result = agreement.measure(model, serve, spec, "validation", batch_size=7)
    assert result["num_examples"] == spec.num_examples("validation")
    assert result["unreadable"] == 0
    assert 0.0 <= result["agreement"] <= 1.0
    assert result["num_disagreements"] == round((1 - result["agreement"])
                                                * result["num_examples"])
    # Accuracy on the stored records is the trainer's own evaluation of the same split.
    probabilities = model.predict(input_lib.eval_dataset(spec, "validation", 16), verbose=0)
    truth = np.concatenate([y for _, y in input_lib.eval_dataset(spec, "validation", 16)])
    assert result["accuracy_on_stored"] == pytest.approx(
        float(np.mean(np.argmax(probabilities, -1) == truth)), abs=1e-5)
    # The served predictions evaluated as the trainer evaluates a split.
    served = result["served"]
    assert served["num_examples"] == result["num_examples"]
    assert served["accuracy"] == result["accuracy_on_originals"]
    assert sum(map(sum, served["confusion_matrix"])) == result["num_examples"]
    assert served["loss"] > 0 and set(served["per_class"]) == set(spec.labels)


def test_metrics_json_gets_served_metrics_next_to_the_stored_ones(exported):
    spec, model, serve, _ = exported
    results = {split: agreement.measure(model, serve, spec, split)
               for split in ("validation", "test")}
    summary = agreement.summarize(results)
    assert set(summary) == {"serving_agreement", "served", "warnings"}
    for split, result in results.items():
        assert summary["served"][split] == result["served"]
        assert "served" not in summary["serving_agreement"][split]
        assert summary["serving_agreement"][split]["agreement"] == result["agreement"]
    assert summary["warnings"] == agreement.warnings_for(results)


def test_serving_the_stored_format_brings_served_predictions_to_the_stored_ones(exported):
    # The exported signature ends with the shards' JPEG round trip; without it (what it
    # served before) the model's outputs on the original files drift further from its
    # outputs on the stored records.
    spec, model, serve, _ = exported
    plain = tf.function(serving.serving_fn(model, spec.labels, spec.height, spec.width,
                                           spec.resize, spec.max_pixels))
    dataset = tf.data.TFRecordDataset([s.path for s in spec.splits["test"]]).batch(64)
    gap = {"stored": [], "plain": []}
    for batch in dataset:
        parsed = tf.io.parse_example(batch, agreement._PARSE)
        sources = tf.sparse.to_dense(parsed[records.SOURCE_ID], default_value=b"").numpy()
        files = tf.constant([agreement._read(row[0].decode()) for row in sources])
        images = input_lib.decode_stored(parsed[records.ENCODED], spec.image_format,
                                         spec.height, spec.width)
        on_stored = model(images, training=False).numpy()
        for name, fn in (("stored", serve), ("plain", plain)):
            gap[name].append(np.abs(fn(image_bytes=files)["probabilities"].numpy()
                                    - on_stored).mean())
    assert np.mean(gap["stored"]) < np.mean(gap["plain"]) / 2, gap


def test_a_source_that_is_gone_is_counted_not_compared(exported, monkeypatch):
    spec, model, serve, _ = exported
    real = agreement._read
    gone: list[str] = []

    def read(uri):
        if not gone:
            gone.append(uri)
            return None
        return real(uri)

    monkeypatch.setattr(agreement, "_read", read)
    result = agreement.measure(model, serve, spec, "test")
    assert result["unreadable"] == 1
    assert result["num_examples"] == spec.num_examples("test") - 1


def test_disagreement_below_the_threshold_is_a_warning_line(exported):
    spec, model, serve, _ = exported

    def shifted(image_bytes):  # the real signature, answering one class off
        outputs = serve(image_bytes=image_bytes)
        return {"class_id": (outputs["class_id"] + 1) % len(spec.labels)}

    result = agreement.measure(model, shifted, spec, "test")
    assert result["agreement"] == 0.0 and result["disagreements"]
    (line,) = agreement.warnings_for({"test": result, "validation": {"agreement": 1.0}})
    assert "serving agreement on test is 0.000" in line


def test_the_gate_evaluates_what_serving_answers(exported, photo_prep, monkeypatch):
    # The retraining gate feeds the test split's original files (unchanged since they
    # were preprocessed) to the signature: its accuracy is the trainer's served accuracy.
    spec, model, serve, path = exported
    manifest = read_manifest(str(photo_prep.output))
    batches = list(gate.split_examples(str(photo_prep.output), manifest, "test"))
    gated = gate.evaluate(path, spec.labels, batches)
    served = agreement.measure(model, serve, spec, "test")["served"]
    assert gated["num_examples"] == served["num_examples"] == manifest.splits["test"].num_examples
    assert gated["accuracy"] == served["accuracy"]
    assert gated["loss"] == pytest.approx(served["loss"], abs=1e-4)
    originals = {p.read_bytes() for p in photo_prep.raw.rglob("*") if p.is_file()}
    assert all(image in originals for images, _ in batches for image in images)

    # A source that is gone or no longer holds the preprocessed bytes: the stored image.
    real = gate._read
    monkeypatch.setattr(gate, "_read", lambda uri: None if "0" in uri else real(uri) + b"x")
    images = [image for batch, _ in gate.split_examples(str(photo_prep.output), manifest,
                                                        "test") for image in batch]
    assert len(images) == gated["num_examples"] and not originals & set(images)

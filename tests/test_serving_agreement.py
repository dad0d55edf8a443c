"""The exported signature on the original files against the model on the stored records."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.contract.manifest import read_manifest
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
    serving.export(model, path, spec.labels, spec.height, spec.width, spec.resize)
    serve = tf.saved_model.load(path).signatures[serving.SIGNATURE]
    return spec, model, serve


def test_agreement_compares_every_record_and_recounts(exported):
    spec, model, serve = exported
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


def test_a_source_that_is_gone_is_counted_not_compared(exported, monkeypatch):
    spec, model, serve = exported
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
    spec, model, serve = exported

    def shifted(image_bytes):  # the real signature, answering one class off
        outputs = serve(image_bytes=image_bytes)
        return {"class_id": (outputs["class_id"] + 1) % len(spec.labels)}

    result = agreement.measure(model, shifted, spec, "test")
    assert result["agreement"] == 0.0 and result["disagreements"]
    (line,) = agreement.warnings_for({"test": result, "validation": {"agreement": 1.0}})
    assert "serving agreement on test is 0.000" in line

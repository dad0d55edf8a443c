"""The trainer end to end on real photos: learns, exports a SavedModel that serves raw
file bytes like the stored images, resumes after a kill, stops cleanly on SIGTERM."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.contract import records
from pipelines.contract.manifest import Manifest, read_manifest
from trainer import agreement, checkpoints, train
from trainer import config as config_lib
from trainer import input as input_lib
from trainer.model import make_model


@pytest.fixture(scope="module")
def trained(photo_prep, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    config = config_lib.parse_args(
        ["--data", str(photo_prep.output), "--model_dir", str(model_dir), "--epochs", "3",
         "--batch_size", "16", "--model", "small_cnn", "--progress", "off"], {})
    return model_dir, train.run(config)


def test_training_learns_well_above_chance(trained):
    model_dir, metrics = trained
    assert json.loads((model_dir / "metrics.json").read_text()) == metrics
    assert metrics["epochs"] == 3 and metrics["resumed_from_epoch"] == 0
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    assert metrics["labels"] == ["astronaut", "cat", "coffee", "rocket"]  # chance: 0.25
    held_out = [metrics[split]["accuracy"] for split in ("validation", "test")]
    assert min(held_out) >= 0.6, metrics
    assert metrics["input_images_per_s"] > 0 and metrics["normalization"]["source"] == (
        "transform_output")
    assert list((model_dir / "logs" / "train").glob("events.out.tfevents.*"))
    assert list((model_dir / "logs" / "validation").glob("events.out.tfevents.*"))


def all_records(prep: Path) -> list[tf.train.Example]:
    manifest = json.loads((prep / "manifest.json").read_text())
    paths = [str(prep / s["path"]) for split in manifest["splits"].values()
             for s in split["shards"]]
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(paths)]


def test_saved_model_serves_raw_bytes_like_the_stored_images(trained, photo_prep):
    model_dir, metrics = trained
    serve = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    examples = all_records(photo_prep.output)
    stored = [e.features.feature[records.ENCODED].bytes_list.value[0] for e in examples]
    sources = [e.features.feature[records.SOURCE_ID].bytes_list.value[0].decode()
               for e in examples]
    original = [Path(uri).read_bytes() for uri in sources]
    assert {Path(uri).suffix for uri in sources} == {".jpg", ".png", ".webp"}

    def predict(blobs):
        outputs = [serve(image_bytes=tf.constant(blobs[i:i + 64])) for i in
                   range(0, len(blobs), 64)]
        return {key: np.concatenate([o[key].numpy() for o in outputs]) for key in outputs[0]}

    on_stored, on_original = predict(stored), predict(original)
    agreement = np.mean(on_stored["class_id"] == on_original["class_id"])
    assert agreement >= 0.99, agreement
    np.testing.assert_allclose(on_original["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    labels = np.array(metrics["labels"], dtype=object)
    assert [s.decode() for s in on_original["label"]] == list(labels[on_original["class_id"]])
    truth = [e.features.feature[records.LABEL].int64_list.value[0] for e in examples]
    assert np.mean(on_original["class_id"] == truth) >= 0.8  # mostly train images


def test_linear_probe_pools_as_global_average_pooling():
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 40, 3), dtype=np.uint8)
    mean, std = np.array([100.0, 120.0, 140.0]), np.array([50.0, 60.0, 70.0])
    probe = make_model("linear", images.shape[1:], 5, mean, std)
    pooled = keras.layers.GlobalAveragePooling2D()(images.astype(np.float32))
    dense = probe.get_layer("probabilities")
    expected = dense((np.asarray(pooled) - mean) / std)
    np.testing.assert_allclose(probe(images), expected, rtol=1e-5, atol=1e-6)


def test_fallback_statistics_agree_with_the_transform_output(photo_prep):
    manifest = read_manifest(str(photo_prep.output))
    spec = input_lib.DataSpec.from_manifest(str(photo_prep.output), manifest)
    from_transform = train.load_normalization(spec)
    sampled = train.load_normalization(
        input_lib.DataSpec(**{**spec.__dict__, "transform_output": None}))
    assert sampled["source"] == "train sample"
    # The transform sums the pipeline's pixels before JPEG storage; the sample decodes
    # the stored JPEGs: a fraction of a level apart.
    np.testing.assert_allclose(sampled["mean"], from_transform["mean"], atol=1.0)
    np.testing.assert_allclose(sampled["std"], from_transform["std"], atol=1.0)


def test_sigterm_stops_training_at_a_batch_boundary():
    recorder = train.EpochRecorder(state=None, history=[], steps=10, global_batch=4,
                                   stop=threading.Event())
    with train.stop_on_sigterm() as stop:
        recorder._stop = stop
        recorder.on_epoch_begin(0)
        recorder.on_train_batch_end(0)
        os.kill(os.getpid(), signal.SIGTERM)  # what Vertex AI sends before preempting
        assert stop.wait(5)
        with pytest.raises(train.Preempted):
            recorder.on_train_batch_end(1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert keras.config.dtype_policy().name == "float32"  # CPU: no mixed precision


def _run_until_checkpoint(command, checkpoint_dir: Path, number: int, sig: int):
    """Starts `command`, sends `sig` once checkpoint `number` (the optimizer's step count
    when it was made) is written."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    state = checkpoint_dir / "checkpoint"  # CheckpointManager writes it after the data
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and f"ckpt-{number}\"" in state.read_text().splitlines()[0]:
            process.send_signal(sig)
            break
        time.sleep(0.01)
    output = process.communicate(timeout=120)[0].decode()
    return process.returncode, output


def test_resumes_after_a_kill_with_the_same_command(photo_prep, tmp_path):
    command = [sys.executable, "-m", "trainer.task", "--data", str(photo_prep.output),
               "--model_dir", str(tmp_path), "--epochs", "3", "--batch_size", "4",
               "--model", "small_cnn", "--progress", "off"]
    steps = input_lib.steps_per_epoch(
        _manifest(photo_prep.output).splits["train"].num_examples, 4)
    code, output = _run_until_checkpoint(command, tmp_path / "checkpoints", steps,
                                         signal.SIGKILL)
    assert code == -signal.SIGKILL, output
    assert not (tmp_path / "metrics.json").exists()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "resuming after epoch 1 of 3" in finished.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs"] == 3
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    assert (tmp_path / "saved_model" / "saved_model.pb").exists()


def _train_linear(data: Path, model_dir: Path, *flags: str) -> dict:
    config = config_lib.parse_args(
        ["--data", str(data), "--model_dir", str(model_dir), "--batch_size", "16",
         "--model", "linear", "--progress", "off", *flags], {})
    return train.run(config)


def _manifest(root: Path) -> Manifest:
    return read_manifest(str(root))


def test_the_data_record_ignores_timings_and_place_but_not_one_image(photo_prep, tmp_path):
    ours = checkpoints.TrainedOn.of(str(photo_prep.output), _manifest(photo_prep.output),
                                    "linear")
    copy = tmp_path / "copy"
    shutil.copytree(photo_prep.output, copy)
    # What an identical rerun changes in the manifest: its timings (and where it lies).
    rerun = dataclasses.replace(_manifest(copy), timings={"started_at": "another day"})
    assert checkpoints.TrainedOn.of(str(copy), rerun, "linear") == ours
    assert checkpoints.TrainedOn.of(str(copy), rerun, "linear").fingerprint == (
        ours.fingerprint)
    assert ours.differences(checkpoints.TrainedOn.of(str(copy), rerun, "small_cnn")) == [
        "model small_cnn -> linear"]
    # One image stored in place of another, same size: only the image index tells.
    index = copy / "index" / "images.jsonl"
    first, *rest = index.read_text().splitlines(keepends=True)
    row = json.loads(first)
    row["sha256"] = "0" * 64
    index.write_text(json.dumps(row, sort_keys=True) + "\n" + "".join(rest))
    other = checkpoints.TrainedOn.of(str(copy), rerun, "linear")
    assert other != ours and other.differences(ours) == ["images"]


def test_checkpoints_of_other_data_are_set_aside_and_training_starts_fresh(
        photo_prep, tmp_path, caplog):
    model_dir, saved = tmp_path / "model", tmp_path / "model" / "checkpoints"
    first = _train_linear(photo_prep.output, model_dir, "--epochs", "1")
    assert json.loads((saved / "data.json").read_text())["fingerprint"] == (
        first["data_fingerprint"])
    # Other data: the same output less one train shard (what --overwrite on fewer images
    # writes in place of the old output).
    other = tmp_path / "other"
    shutil.copytree(photo_prep.output, other)
    manifest = _manifest(other).to_json()
    dropped = manifest["splits"]["train"]["shards"].pop()
    manifest["splits"]["train"]["num_examples"] -= dropped["num_examples"]
    (other / "manifest.json").write_text(json.dumps(manifest))

    # --warm_start naming this run's own checkpoints reads them where they were moved.
    metrics = _train_linear(other, model_dir, "--epochs", "2", "--warm_start", str(saved))
    assert (f"checkpoints in {saved} were made on other data or another model "
            f"(differs: splits); starting fresh; they are now in {saved}/previous"
            ) in caplog.text
    assert metrics["resumed_from_epoch"] == 0 and metrics["epochs"] == 2
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    one_epoch = f"ckpt-{first['steps_per_epoch']}"  # numbered by the optimizer's steps
    assert metrics["warm_started_from"] == f"{saved}/previous/{one_epoch}"
    assert metrics["data_fingerprint"] != first["data_fingerprint"]
    assert json.loads((saved / "previous" / "data.json").read_text())["fingerprint"] == (
        first["data_fingerprint"])
    assert sorted(p.name for p in (saved / "previous").iterdir()) == [
        "checkpoint", f"{one_epoch}.data-00000-of-00001", f"{one_epoch}.index", "data.json"]

    caplog.clear()  # the same data again: resumed (all epochs done: evaluate and export)
    again = _train_linear(other, model_dir, "--epochs", "2")
    assert again["resumed_from_epoch"] == 2 and "other data" not in caplog.text


def test_metrics_say_how_often_serving_the_original_files_agrees(trained, photo_prep):
    _, metrics = trained
    manifest = read_manifest(str(photo_prep.output))
    for split in ("validation", "test"):
        result = metrics["serving_agreement"][split]
        assert result["num_examples"] == manifest.splits[split].num_examples
        assert 0.0 <= result["agreement"] <= 1.0 and result["unreadable"] == 0
        assert result["accuracy_on_stored"] == pytest.approx(metrics[split]["accuracy"],
                                                             abs=1e-4)
    assert metrics["warnings"] == agreement.warnings_for(metrics["serving_agreement"])


def test_the_report_has_every_section_and_the_wrong_images(trained):
    from trainer import report
    model_dir, metrics = trained
    page = (model_dir / "report.html").read_text()
    assert metrics["report"] == f"{model_dir}/report.html"
    for key, title in report.SECTIONS:
        assert f'<section id="{key}"><h2>{title}</h2>' in page, key
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # One thumbnail per wrong test prediction (at most MAX_WRONG), each with its labels.
    matrix = np.array(metrics["test"]["confusion_matrix"])
    wrong = min(int(matrix.sum() - np.trace(matrix)), report.MAX_WRONG)
    assert page.count('<img src="data:image/jpeg;base64,') == wrong
    assert page.count("<figcaption>predicted <b>") == wrong
    assert page.count("<polyline") == 4  # loss, val_loss, accuracy, val_accuracy
    assert set(metrics["timings"]) >= {"setup_and_train_s", "evaluate_s", "export_s",
                                       "total_s"}


def test_confidently_wrong_orders_by_the_wrong_label_s_probability():
    from trainer.report import confidently_wrong
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05]])
    labels = np.array([0, 0, 1, 0, 1])  # wrong: 1 (0.8), 2 (0.6), 3 (0.7), 4 (0.95)
    assert confidently_wrong(probabilities, labels) == [4, 1, 3, 2]
    assert confidently_wrong(probabilities, labels, limit=2) == [4, 1]
    assert confidently_wrong(probabilities[:1], labels[:1]) == []

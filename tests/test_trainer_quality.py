"""Models users would keep: pretrained weights with the input scaling they expect, inside
the served model; a freeze-then-fine-tune schedule; class weights; per-class evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.contract import imaging_tf, records
from pipelines.contract.imaging import ResizeMode
from pipelines.contract.manifest import read_manifest
from trainer import config as config_lib
from trainer import evaluation, train
from trainer import input as input_lib
from trainer.model import (
    NORMALIZATION,
    input_scaling,
    make_backbone,
    make_model,
    save_backbone_weights,
    weights_scaling,
)

IMAGE = (64, 64, 3)


def _weights_file(tmp_path: Path, name: str = "mobilenet_v3_small") -> tuple[Path, list]:
    """A weights file of `name`'s backbone, as a user would bring: random, saved."""
    backbone = make_backbone(name, IMAGE, "none")
    path = tmp_path / f"{name}.weights.h5"
    backbone.save_weights(str(path))
    return path, backbone.get_weights()


def test_a_weights_file_loads_into_the_backbone(tmp_path):
    path, saved = _weights_file(tmp_path)
    model = make_model("mobilenet_v3_small", IMAGE, 4, np.zeros(3), np.ones(3),
                       weights=str(path))
    loaded = model.get_layer("backbone").get_weights()
    assert len(loaded) == len(saved)
    for got, want in zip(loaded, saved, strict=True):
        np.testing.assert_array_equal(got, want)
    # Pretrained: the application's own scaling, not mean/std.
    assert "normalize" not in [layer.name for layer in model.layers]
    # BatchNorm: pretrained keeps the application's momentum (and runs in inference mode);
    # from scratch it settles as fast as small_cnn's.
    def momenta(built):
        return {layer.momentum for layer in built.get_layer("backbone").layers
                if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta(model) == {0.999}
    assert momenta(make_model("mobilenet_v3_small", IMAGE, 4, np.zeros(3), np.ones(3))) == {0.9}


def test_a_weights_file_of_ours_keeps_the_scaling_it_learnt_with(tmp_path):
    # A from-scratch run learns on mean/std-normalised pixels; its weights file says so, and
    # a model loading it normalises again instead of the application's [-1, 1] rescaling
    # (with which fine-tuning from such a file ended below chance).
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 50.0, 40.0])
    scratch = make_model("mobilenet_v3_small", IMAGE, 4, mean, std)
    path = tmp_path / "ours.weights.h5"
    save_backbone_weights(scratch, str(path))
    assert weights_scaling(str(path)) == NORMALIZATION
    loaded = make_model("mobilenet_v3_small", IMAGE, 4, mean, std, weights=str(path))
    assert input_scaling(loaded) == NORMALIZATION
    loaded.get_layer("probabilities").set_weights(
        scratch.get_layer("probabilities").get_weights())
    images = np.random.default_rng(0).integers(0, 256, (4, *IMAGE), dtype=np.uint8)
    np.testing.assert_allclose(loaded(images, training=False), scratch(images, training=False),
                               atol=1e-6)
    # A file without the record (ImageNet weights, a random backbone) is the application's.
    assert weights_scaling(str(_weights_file(tmp_path)[0])) != NORMALIZATION


def test_imagenet_offline_fails_with_one_clear_line(photo_prep, tmp_path):
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"),  # no cached weights
           # Nothing listens on port 9: the download fails here even with a network.
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-m", "trainer.task", "--data", str(photo_prep.output), "--model_dir",
         str(tmp_path / "model"), "--model", "mobilenet_v3_small", "--weights", "imagenet",
         "--epochs", "1", "--progress", "off"], capture_output=True, text=True, timeout=300,
        env=env)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs the internet to download ImageNet weights; pass " \
        "--weights PATH to a weights file" in errors[0], done.stderr


def test_usage_errors_for_weights_and_schedule():
    base = ["--data", "d", "--model_dir", "m"]
    for flags in (["--weights", "imagenet"],  # small_cnn has none
                  ["--model", "resnet50", "--freeze_epochs", "2"],  # random backbone
                  ["--model", "resnet50", "--weights", "w.h5", "--unfreeze", "3"]):
        with pytest.raises(config_lib.UsageError):
            config_lib.parse_args(base + flags, {})


def test_phases_follow_the_freeze_schedule():
    def config(*flags):
        return config_lib.parse_args(["--data", "d", "--model_dir", "m", "--epochs", "5",
                                      "--model", "resnet50", "--weights", "w", *flags], {})
    assert train.phases(config()) == [train.Phase(0, 5, False, 1e-3)]
    assert train.phases(config("--freeze_epochs", "2")) == [
        train.Phase(0, 2, True, 1e-3), train.Phase(2, 5, False, 1e-4)]
    assert train.phases(config("--freeze_epochs", "9", "--fine_tune_learning_rate", "0.5")
                        ) == [train.Phase(0, 5, True, 1e-3)]


def test_balanced_class_weights():
    # n / (k * count): 12 examples, 3 classes.
    assert train.balanced_class_weights([6, 4, 2]) == {0: 12 / 18, 1: 12 / 12, 2: 12 / 6}
    assert train.balanced_class_weights([3, 0]) == {0: 3 / 6, 1: 0.0}


def _stored_test_images(prep: Path) -> tuple[list[bytes], input_lib.DataSpec]:
    spec = input_lib.DataSpec.from_manifest(str(prep), read_manifest(str(prep)))
    raw = tf.data.TFRecordDataset([s.path for s in spec.splits["test"]])
    return [records.parse_example(r.numpy())[records.ENCODED][0] for r in raw], spec


# Each --weights kind with an --augment that changes train batches (strong mixes labels):
# augmentation lives in the train input only, so serving must equal the trained model.
@pytest.mark.parametrize("weights,augment", [("none", "strong"), ("file", "light")])
def test_served_model_computes_what_training_computed(photo_prep, tmp_path, weights, augment):
    flags = ["--epochs", "1", "--augment", augment]
    if weights == "file":
        path, _ = _weights_file(tmp_path)
        weights = str(path)
        flags = ["--epochs", "2", "--freeze_epochs", "1", "--class_weight", "balanced",
                 "--augment", augment]
    model_dir = tmp_path / "model"
    config = config_lib.parse_args(
        ["--data", str(photo_prep.output), "--model_dir", str(model_dir), "--batch_size",
         "16", "--model", "mobilenet_v3_small", "--weights", weights, "--progress", "off",
         *flags], {})
    metrics = train.run(config)
    assert metrics["epochs"] == config.epochs and metrics["weights"] == weights
    assert metrics["augment"] == list(config_lib.parse_augment(augment))
    assert metrics["exported_epoch"] == config.epochs  # no --early_stopping: the last
    test = metrics["test"]
    assert list(test["per_class"]) == metrics["labels"]
    assert sum(map(sum, test["confusion_matrix"])) == sum(
        row["support"] for row in test["per_class"].values())
    assert test["top_k_accuracy"]["k"] == 4 and 0 <= test["expected_calibration_error"] <= 1
    blobs, spec = _stored_test_images(photo_prep.output)
    norm = train.load_normalization(spec)
    model = make_model("mobilenet_v3_small", IMAGE, len(spec.labels), norm["mean"],
                       norm["std"], weights=weights)
    train.warm_start(model, str(model_dir / "checkpoints"))  # the trained weights
    # The signature's pixels: decode, resize, then the shards' JPEG round trip.
    images = np.stack([imaging_tf.process_image(tf.constant(b), (64, 64), ResizeMode(spec.resize),
                                                spec.max_pixels, spec.image_format,
                                                spec.jpeg_quality).numpy() for b in blobs])
    serve = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    served = serve(image_bytes=tf.constant(blobs))["probabilities"].numpy()
    np.testing.assert_allclose(served, model.predict(images, verbose=0), atol=1e-5)
    if weights != "none":
        assert [p["frozen"] for p in metrics["schedule"]] == [True, False]
        assert set(metrics["class_weight"]) == set(metrics["labels"])
        assert json.loads((model_dir / "metrics.json").read_text())["input_scaling"] == (
            "mobilenet_v3_small preprocessing")


def test_evaluation_against_hand_computed_numbers():
    # 3 classes, 6 examples; argmax predictions: 0, 0, 1, 1, 2, 0; true: 0, 0, 1, 2, 2, 2.
    probabilities = np.array([
        [0.90, 0.05, 0.05],  # true 0, right, confidence 0.9
        [0.60, 0.30, 0.10],  # true 0, right, 0.6
        [0.20, 0.70, 0.10],  # true 1, right, 0.7
        [0.10, 0.50, 0.40],  # true 2, wrong (2 second), 0.5
        [0.05, 0.15, 0.80],  # true 2, right, 0.8
        [0.40, 0.35, 0.25],  # true 2, wrong (2 third), 0.4
    ])
    labels = np.array([0, 0, 1, 2, 2, 2])
    got = evaluation.evaluate(probabilities, labels, ["a", "b", "c"])
    assert got["confusion_matrix"] == [[2, 0, 0], [0, 1, 0], [1, 1, 1]]
    # a: precision 2/3, recall 2/2; b: 1/2, 1/1; c: 1/1, 1/3.
    assert got["per_class"] == {
        "a": {"precision": 0.66667, "recall": 1.0, "f1": 0.8, "support": 2},
        "b": {"precision": 0.5, "recall": 1.0, "f1": 0.66667, "support": 1},
        "c": {"precision": 1.0, "recall": 0.33333, "f1": 0.5, "support": 3},
    }
    assert got["top_k_accuracy"] == {"k": 3, "value": 1.0}
    assert evaluation.top_k_accuracy(probabilities, labels, 2) == 5 / 6
    # 15 bins of 1/15: 0.4 in bin 6, 0.5 in 7, 0.6 in 8, 0.7 in 10, 0.8 in 11, 0.9 in 13,
    # one example each: ECE = mean |correct - confidence|.
    expected = np.mean([0.1, 0.4, 0.3, 0.5, 0.2, 0.4])
    assert got["expected_calibration_error"] == round(expected, 5)
    # Two in one bin: |mean correct - mean confidence| weighted by the bin's share.
    two = evaluation.expected_calibration_error(np.array([[0.91, 0.09], [0.93, 0.07]]),
                                                np.array([0, 1]))
    assert two == pytest.approx(abs(0.5 - 0.92))
    # A class never predicted and one without examples: 0, not NaN.
    empty = evaluation.evaluate(np.array([[0.9, 0.1]]), np.array([0]), ["x", "y"])
    assert empty["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                       "support": 0}


def test_learning_rate_warms_up_then_decays_in_each_phase():
    from trainer.schedule import Phase, PhasedSchedule
    steps = 10  # per epoch
    two = PhasedSchedule([Phase(0, 2, True, 1e-3), Phase(2, 5, False, 1e-4)], steps)
    rate = [float(two(step)) for step in range(60)]
    # Warmup: a tenth of each phase (2 and 3 steps), linear up to the phase's peak.
    first = [5e-4, 1e-3, 1e-3, 1e-3 * (1 + np.cos(np.pi / 18)) / 2]
    assert rate[:4] == pytest.approx(first, rel=1e-5)
    assert rate[20:23] == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4], rel=1e-5)
    # Cosine to (almost) 0 at each phase's last step; past the end it stays there.
    assert rate[19] == pytest.approx(1e-3 * (1 + np.cos(np.pi * 17 / 18)) / 2, rel=1e-5)
    assert rate[49] == pytest.approx(1e-4 * (1 + np.cos(np.pi * 26 / 27)) / 2, rel=1e-5)
    assert rate[59] == rate[49]
    assert all(a >= b for a, b in zip(rate[1:20], rate[2:20], strict=False))
    constant = PhasedSchedule([Phase(0, 3, False, 1e-3)], steps, "constant")
    assert [float(constant(s)) for s in (0, 29)] == pytest.approx([1e-3, 1e-3], rel=1e-5)
    explicit = PhasedSchedule([Phase(0, 3, False, 1e-3)], steps, warmup_epochs=1.5)
    assert float(explicit(14)) == pytest.approx(1e-3) and float(explicit(13)) < 1e-3


@pytest.mark.parametrize("names", ["light", "strong"])
def test_augmentation_is_a_function_of_the_batch_and_its_number(names):
    from trainer import augment
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8) % 4

    def batches(augmenter):  # parallel and out of order when allowed
        ds = tf.data.Dataset.from_tensors((images, labels)).repeat(4).enumerate().map(
            lambda i, b: augmenter(b[0], b[1], augment.batch_seed(0, i)),
            num_parallel_calls=4, deterministic=True)
        return [(x.numpy(), y.numpy()) for x, y in ds]

    parsed = config_lib.parse_augment(names)
    first, again = batches(augment.Augmenter(parsed, 4)), batches(augment.Augmenter(parsed, 4))
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        assert x.dtype == np.uint8 and x.shape == images.shape
    assert not np.array_equal(first[0][0], first[1][0])  # another batch number, other draws
    assert not np.array_equal(first[0][0], images)
    if augment.mixes(parsed):  # label distributions that sum to 1
        assert first[0][1].shape == (8, 4)
        np.testing.assert_allclose(first[0][1].sum(axis=1), 1.0, atol=1e-6)
    else:
        np.testing.assert_array_equal(first[0][1], labels)
    with pytest.raises(config_lib.UsageError, match="unknown: blur"):
        config_lib.parse_args(["--data", "d", "--model_dir", "m", "--augment", "flip,blur"], {})


def test_soft_and_sparse_labels_give_the_same_loss_and_accuracy():
    from trainer import augment
    probabilities = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    ids = tf.constant([0, 1])
    onehot = tf.one_hot(ids, 3)
    np.testing.assert_allclose(augment.soft_or_sparse_crossentropy(onehot, probabilities),
                               augment.soft_or_sparse_crossentropy(ids, probabilities),
                               rtol=1e-6)
    for labels in (ids, onehot):
        metric = augment.SoftOrSparseAccuracy()
        metric.update_state(labels, probabilities)
        assert float(metric.result()) == 0.5


def test_early_stopping_keeps_the_best_epoch_through_a_checkpoint(tmp_path):
    from trainer import checkpoints, distribute
    model = make_model("linear", (8, 8, 3), 2, np.zeros(3), np.ones(3))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    runtime = distribute.setup("off", "off")
    trained_on = checkpoints.TrainedOn("linear", ("a", "b"), "8x8 png squash", "s", "i")

    def state():
        made = checkpoints.TrainingState(model, str(tmp_path), runtime, trained_on,
                                         keep_best=True)
        return made, made.restore()

    first, _ = state()
    history: list[dict] = []
    best = train.BestEpoch(first, history, patience=2)
    dense = model.get_layer("probabilities")
    weights_of = {}
    for epoch, val_loss in enumerate([1.0, 0.5, 0.7, 0.8, 0.1]):
        dense.kernel.assign(np.full(dense.kernel.shape, epoch + 1.0, np.float32))
        weights_of[epoch + 1] = dense.kernel.numpy().copy()
        best.on_epoch_end(epoch, {"val_loss": val_loss})
        history.append({"epoch": epoch + 1, "val_loss": val_loss})
        first.save(epoch + 1, history)
        if model.stop_training:
            break
    # Epoch 2 was best; epochs 3 and 4 were not better: stop after 4 (patience 2).
    assert best.stopped_after == 4 and len(history) == 4
    assert train.best_epoch(history) == (2, 0.5)
    # A new process: the checkpoint brings the history and the best weights back.
    dense.kernel.assign(np.zeros(dense.kernel.shape, np.float32))
    second, restored = state()
    assert (restored.epoch, restored.step, restored.best_epoch) == (4, 0, 2)
    np.testing.assert_array_equal(dense.kernel.numpy(), weights_of[4])  # the last epoch
    assert second.load_best() == 2
    np.testing.assert_array_equal(dense.kernel.numpy(), weights_of[2])


def _sha256s(dataset, batches: int | None = None) -> list[list[str]]:
    """Per batch, the sha256 of each image's pixels (and its label)."""
    import hashlib
    taken = dataset if batches is None else dataset.take(batches)
    return [[hashlib.sha256(image.tobytes() + bytes([int(np.argmax(label) if np.ndim(label)
                                                         else label)])).hexdigest()
             for image, label in zip(images.numpy(), labels.numpy(), strict=True)]
            for images, labels in taken]


def test_a_mid_epoch_resume_sees_each_remaining_record_once_in_the_same_order(photo_prep):
    spec = input_lib.DataSpec.from_manifest(str(photo_prep.output),
                                            read_manifest(str(photo_prep.output)))
    config = config_lib.parse_args(
        ["--data", str(photo_prep.output), "--model_dir", "unused", "--batch_size", "8",
         "--seed", "3", "--augment", "light", "--deterministic"], {})
    epoch, steps = 1, input_lib.steps_per_epoch(spec.num_examples("train"), 8)
    skip = steps // 2
    whole = _sha256s(train._train_input(config, spec, epoch, epoch + 1)(None))
    resumed = _sha256s(train._train_input(config, spec, epoch, epoch + 1, skip)(None))
    assert len(whole) == steps and len(resumed) == steps - skip
    # The same batches from the step the checkpoint names, augmented the same way...
    assert resumed == whole[skip:]
    # ...and, before the kill and after it, every train record exactly once that epoch.
    plain = dataclasses.replace(config, augment=())
    seen = _sha256s(train._train_input(plain, spec, epoch, epoch + 1)(None), skip) + (
        _sha256s(train._train_input(plain, spec, epoch, epoch + 1, skip)(None)))
    every = [h for batch in _sha256s(input_lib.eval_dataset(spec, "train", 64)) for h in batch]
    flat = [h for batch in seen for h in batch]
    assert sorted(flat) == sorted(every) and len(set(every)) == len(every)
    # Another epoch is another order.
    assert _sha256s(train._train_input(plain, spec, epoch + 1, epoch + 2)(None)) != seen


def _latest_number(checkpoint_dir: Path) -> int | None:
    state = checkpoint_dir / "checkpoint"  # CheckpointManager writes it after the data
    if not state.exists() or not state.read_text():
        return None
    return int(state.read_text().splitlines()[0].split("ckpt-")[1].rstrip('"'))


def test_a_run_killed_mid_epoch_resumes_at_that_step(photo_prep, tmp_path):
    command = [sys.executable, "-m", "trainer.task", "--data", str(photo_prep.output),
               "--model_dir", str(tmp_path), "--epochs", "1", "--batch_size", "8",
               "--model", "small_cnn", "--augment", "none", "--progress", "off",
               "--steps_per_execution", "1", "--checkpoint_every", "4"]
    spec = input_lib.DataSpec.from_manifest(str(photo_prep.output),
                                            read_manifest(str(photo_prep.output)))
    steps = input_lib.steps_per_epoch(spec.num_examples("train"), 8)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if _latest_number(tmp_path / "checkpoints"):  # the first, at step 4 of epoch 1
            process.kill()
            break
        time.sleep(0.005)
    stderr = process.communicate(timeout=60)[1].decode()
    assert process.returncode == -signal.SIGKILL, stderr
    killed_at = _latest_number(tmp_path / "checkpoints")
    epoch, step = divmod(killed_at, steps)
    assert step, f"checkpoint {killed_at} is an epoch end: the kill came too late"
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"resuming at step {step} of epoch 1 of 1" in finished.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert epoch == 0 and metrics["resumed_from"] == {"epoch": 0, "step": step}
    # The epoch's row: only the steps the resumed run trained.
    assert [(row["epoch"], row["steps"]) for row in metrics["history"]] == [(1, steps - step)]

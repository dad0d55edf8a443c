"""Models users would keep: pretrained weights with the input scaling they expect, inside
the served model; a freeze-then-fine-tune schedule; class weights; per-class evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipelines.contract import imaging_tf, records
from pipelines.contract.imaging import ResizeMode
from pipelines.contract.manifest import read_manifest
from trainer import config as config_lib
from trainer import evaluation, train
from trainer import input as input_lib
from trainer.model import make_backbone, make_model

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


@pytest.mark.parametrize("weights", ["none", "file"])
def test_served_model_computes_what_training_computed(photo_prep, tmp_path, weights):
    flags = ["--epochs", "1"]
    if weights == "file":
        path, _ = _weights_file(tmp_path)
        weights = str(path)
        flags = ["--epochs", "2", "--freeze_epochs", "1", "--class_weight", "balanced"]
    model_dir = tmp_path / "model"
    config = config_lib.parse_args(
        ["--data", str(photo_prep.output), "--model_dir", str(model_dir), "--batch_size",
         "16", "--model", "mobilenet_v3_small", "--weights", weights, "--progress", "off",
         *flags], {})
    metrics = train.run(config)
    assert metrics["epochs"] == config.epochs and metrics["weights"] == weights
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

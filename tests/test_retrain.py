"""The retraining tick's parts without running a tick: flags, gate rule, fingerprint,
atomic pointer writes, warm-start choice, the trainer's --warm_start, Vertex job spec."""

import dataclasses
import json
import os

import numpy as np
import pytest

from pipelines.contract.jsonio import write_json_atomically
from pipelines.contract.manifest import Accounting, ImageSpec, Manifest
from pipelines.preprocessing.options import UsageError
from pipelines.retraining import gate
from pipelines.retraining import tick as retrain

BASE = ["--input", "/data/raw", "--root", "/data/root"]


def test_parse_args_splits_every_step_s_flags():
    config = retrain.parse_args([*BASE, "--image_size", "32", "--model", "linear", "--epochs",
                                 "1", "--gate_margin", "0.05", "--block_on_drift", "warning",
                                 "--direct_running_mode", "in_memory", "--deterministic"])
    assert config.root == "/data/root" and config.trainer == "local"
    assert config.trainer_args == ("--model", "linear", "--epochs", "1", "--deterministic")
    assert config.preprocess_args == ("--input", "/data/raw", "--image_size", "32",
                                      "--direct_running_mode", "in_memory")
    assert config.preprocess.image.height == 32 and config.model == "linear"
    assert config.rule == gate.GateRule("accuracy", 0.05, "warning")
    assert config.trainer_warm_start  # the trainer has --warm_start


@pytest.mark.parametrize("extra, message", [
    (["--output", "/x"], "set by the tick"),
    (["--warm_start=/ckpt"], "set by the tick"),
    (["--epoch", "3"], "unknown option"),  # a typo must not pass silently
    (["--epochs", "0"], "trainer flags"),
    (["--run_id", "../up"], "--run_id"),
    (["--trainer", "vertex", "--project", "p", "--region", "r"], "--trainer_image"),
    (["--trainer", "vertex", "--trainer_image", "img", "--project", "p", "--region", "r"],
     "gs:// --root"),
])
def test_parse_args_refuses_what_a_tick_cannot_run(extra, message):
    with pytest.raises(UsageError, match=message):
        retrain.parse_args([*BASE, *extra])


def test_vertex_job_is_checked_before_the_tick_and_placed_in_each_run():
    config = retrain.parse_args(["--input", "gs://b/raw", "--root", "gs://b/root", "--trainer",
                                 "vertex", "--trainer_image", "eu.gcr.io/p/img:1", "--project",
                                 "p", "--region", "europe-west4", "--runner", "DataflowRunner",
                                 "--vertex_accelerator_type", "NVIDIA_TESLA_T4",
                                 "--vertex_machine_type", "n1-standard-8"])
    assert (config.vertex.project, config.vertex.region) == ("p", "europe-west4")
    with pytest.raises(UsageError, match="Vertex AI job"):  # a T4 does not fit a g2 machine
        retrain.parse_args(["--input", "gs://b/raw", "--root", "gs://b/root", "--trainer",
                            "vertex", "--trainer_image", "img", "--project", "p", "--region",
                            "r", "--vertex_accelerator_type", "NVIDIA_TESLA_T4"])


def evaluation(accuracy, loss=1.0, n=10):
    return {"num_examples": n, "accuracy": accuracy, "loss": loss}


@pytest.mark.parametrize("candidate, baseline, blocking, rule, promoted, why", [
    (evaluation(0.5), None, [], gate.GateRule(), True, "no current model"),
    (evaluation(0.89), evaluation(0.90), [], gate.GateRule(margin=0.02), True, "passes"),
    (evaluation(0.87), evaluation(0.90), [], gate.GateRule(margin=0.02), False, "fails"),
    (evaluation(0.91), evaluation(0.90), [], gate.GateRule(margin=-0.02), False, "fails"),
    (evaluation(0.9, loss=0.50), evaluation(0.9, loss=0.40), [],
     gate.GateRule(metric="loss", margin=0.05), False, "loss"),
    (evaluation(0.9, loss=0.44), evaluation(0.9, loss=0.40), [],
     gate.GateRule(metric="loss", margin=0.05), True, "loss"),
    (evaluation(0.99), evaluation(0.5), [{"kind": "class_vanished", "severity": "error"}],
     gate.GateRule(), False, "drift blocks"),
    (evaluation(None, None, n=0), evaluation(None, None, n=0), [], gate.GateRule(), False,
     "empty"),
])
def test_gate_decision(candidate, baseline, blocking, rule, promoted, why):
    decision = gate.decide(candidate, baseline, blocking, rule)
    assert decision.promoted is promoted and why in decision.reason, decision


def test_gate_on_macro_recall_and_the_largest_class_drop():
    # 10 test images: "a" 8, "b" 2. The candidate gains on the big class, loses the small one.
    current = {"num_examples": 10, "accuracy": 0.7, "loss": 0.5,
               **gate.recalls({"a": [5, 8], "b": [2, 2]})}
    candidate = {"num_examples": 10, "accuracy": 0.8, "loss": 0.5,
                 **gate.recalls({"a": [7, 8], "b": [1, 2]})}
    assert current["recall"] == {"a": 0.625, "b": 1.0} and current["macro_recall"] == 0.8125
    assert candidate["macro_recall"] == 0.6875  # (0.875 + 0.5) / 2
    assert gate.decide(candidate, current, [], gate.GateRule()).promoted  # accuracy rose
    by_recall = gate.decide(candidate, current, [], gate.GateRule(metric="macro_recall"))
    assert not by_recall.promoted and "macro_recall 0.6875 fails" in by_recall.reason
    dropped = gate.decide(candidate, current, [], gate.GateRule(max_class_drop=0.4))
    assert not dropped.promoted and "b 1.000 -> 0.500" in dropped.reason, dropped
    allowed = gate.decide(candidate, current, [], gate.GateRule(max_class_drop=0.5))
    assert allowed.promoted and "no class recall fell more than 0.5" in allowed.reason
    assert gate.class_drops({"a": 0.9}, {"a": 0.95, "gone": 0.2}, 0.1) == [("gone", 0.2, 0.0)]
    with pytest.raises(ValueError, match="max_class_drop"):
        gate.GateRule(max_class_drop=1.5)


def test_gate_flags_reach_the_rule_and_retrain_json_settings():
    config = retrain.parse_args([*BASE, "--gate_metric", "macro_recall",
                                 "--gate_max_class_drop", "0.1"])
    assert config.rule == gate.GateRule("macro_recall", 0.02, "error", 0.1)
    # retrain.json's settings.gate is the rule as a dict: both are recorded.
    assert dataclasses.asdict(config.rule)["max_class_drop"] == 0.1
    with pytest.raises(UsageError, match="--gate_max_class_drop"):
        retrain.parse_args([*BASE, "--gate_max_class_drop", "2"])


def test_which_drift_blocks():
    anomalies = [{"kind": "class_vanished", "severity": "error"},
                 {"kind": "label_distribution_shift", "severity": "warning"}]
    kinds = {block: [a["kind"] for a in gate.blocking_anomalies(anomalies, gate.GateRule(
        block_on_drift=block))] for block in ("error", "warning", "none")}
    assert kinds == {"error": ["class_vanished"],
                     "warning": ["class_vanished", "label_distribution_shift"], "none": []}


def test_pointer_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = str(tmp_path / "current.json")
    write_json_atomically(path, {"run_id": "a"})
    write_json_atomically(path, {"run_id": "b"})
    assert json.loads(open(path).read()) == {"run_id": "b"}
    assert os.listdir(tmp_path) == ["current.json"]  # no temporary left behind

    def crash(*args):
        raise KeyboardInterrupt  # killed between writing the new file and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomically(path, {"run_id": "c"})
    assert json.loads(open(path).read()) == {"run_id": "b"}


def test_fingerprint_moves_with_the_input_files_and_flags(tmp_path):
    raw = tmp_path / "raw"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "a.jpg").write_bytes(b"a")
    config = retrain.parse_args(["--input", str(raw), "--root", str(tmp_path / "root")])
    first, count = retrain.input_fingerprint(config)
    assert count == 1 and retrain.input_fingerprint(config)[0] == first
    (raw / ".DS_Store").write_bytes(b"ignored like the preprocess job ignores it")
    assert retrain.input_fingerprint(config)[0] == first
    (raw / "cat" / "b.jpg").write_bytes(b"b")
    second = retrain.input_fingerprint(config)[0]
    assert second != first
    os.utime(raw / "cat" / "b.jpg", (1, 1))  # rewritten (same size): another mtime
    assert retrain.input_fingerprint(config)[0] != second
    retrained = retrain.parse_args(["--input", str(raw), "--root", "r", "--epochs", "3"])
    assert retrain.input_fingerprint(retrained)[0] != retrain.input_fingerprint(config)[0]


def test_warm_start_only_from_a_model_with_the_same_labels_model_and_size(tmp_path):
    config = retrain.parse_args([*BASE, "--model", "linear", "--image_size", "32"])
    manifest = Manifest(input=None, config={}, image=ImageSpec(32, 32, 3, "jpeg", "squash"),
                        labels=("a", "b"), splits={}, accounting=Accounting(0, 0, 0, 0, 0, 0, 0))
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    current = {"run_id": "r1", "labels": ["a", "b"], "model": "linear", "image": [32, 32],
               "checkpoints": str(checkpoints)}

    def source(**change):
        return retrain.warm_start_from(config, {**current, **change}, manifest)

    assert source() == (str(checkpoints), "warm start from run r1 (same labels and model)")
    assert retrain.warm_start_from(config, None, manifest)[0] is None
    assert "label set changed" in source(labels=["a", "b", "c"])[1]
    assert "model" in source(model="small_cnn")[1] and source(model="small_cnn")[0] is None
    assert "image size" in source(image=[64, 64])[1]
    assert "no checkpoint" in source(checkpoints=str(tmp_path / "gone"))[1]


def test_trainer_warm_start_copies_weights_but_not_normalization(tmp_path):
    import tensorflow as tf

    from trainer import train
    from trainer.model import make_model

    def model(mean):
        return make_model("linear", (8, 8, 3), 2, np.full(3, mean, np.float32),
                          np.ones(3, np.float32))

    earlier = model(10.0)
    for weight in earlier.trainable_weights:
        weight.assign(tf.random.normal(weight.shape, seed=1))
    tf.train.Checkpoint(model=earlier).save(str(tmp_path / "ckpt"))
    later = model(100.0)
    assert train.warm_start(later, str(tmp_path)).endswith("ckpt-1")
    for a, b in zip(earlier.trainable_weights, later.trainable_weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    pixels = np.full((1, 8, 8, 3), 100, np.uint8)
    # The later model normalises with its own statistics: 100 -> 0, not (100 - 10).
    normalize = later.get_layer("normalize")
    np.testing.assert_allclose(normalize(pixels.astype(np.float32)).numpy(), 0.0)
    with pytest.raises(FileNotFoundError):
        train.warm_start(later, str(tmp_path / "empty"))


def test_unchanged_input_ends_the_tick_before_any_work(tmp_path):
    raw, root = tmp_path / "raw", tmp_path / "root"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "a.jpg").write_bytes(b"a")
    config = retrain.parse_args(["--input", str(raw), "--root", str(root)])
    fingerprint = retrain.input_fingerprint(config)[0]
    (root / "runs" / "20250101-000000-000000").mkdir(parents=True)
    write_json_atomically(str(root / "runs" / "20250101-000000-000000" / "retrain.json"),
                          {"run_id": "20250101-000000-000000", "fingerprint": fingerprint})
    # A later tick killed mid-way: no retrain.json, so it is not the last finished tick.
    (root / "runs" / "20250102-000000-000000" / "data").mkdir(parents=True)
    record = retrain.tick(config)
    assert record.status == "no_new_data" and record.same_as_run == "20250101-000000-000000"
    assert json.loads((root / "runs" / record.run_id / "retrain.json").read_text()) == (
        record.to_json())
    assert not (root / "current.json").exists()

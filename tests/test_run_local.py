"""`python -m pipelines.run --trainer local`: flag routing, child processes, and the whole
way from real photos to a SavedModel."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import run
from pipelines.preprocessing import options as preprocess_options
from pipelines.preprocessing.options import UsageError
from tests.support.demo_data import make_demo_images


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions
            if not isinstance(action, argparse._HelpAction) for option in action.option_strings}


def _beam_flags() -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    for cls in preprocess_options._all_subclasses(PipelineOptions):
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            continue
    return _option_strings(parser)


def test_flag_names_route_unambiguously():
    trainer = set(run.trainer_flag_arity())
    preprocess = _option_strings(preprocess_options._parser())
    beam = _beam_flags()
    own = _option_strings(run._parser())
    assert not trainer & (preprocess | beam | own)
    # run's --output is the root of both steps; --dry_run shadows Beam's test-only flag.
    assert own & (preprocess | beam) == {"--output", "--dry_run"}


def test_trainer_flags_are_split_out_with_their_values():
    trainer, other = run.split_trainer_flags([
        "--input", "raw", "--epochs", "3", "--image_size=96", "--model=linear",
        "--deterministic", "--runner", "DirectRunner", "--batch_size", "8"])
    assert trainer == ["--epochs", "3", "--model=linear", "--deterministic", "--batch_size", "8"]
    assert other == ["--input", "raw", "--image_size=96", "--runner", "DirectRunner"]
    with pytest.raises(UsageError, match="--epochs needs a value"):
        run.split_trainer_flags(["--epochs"])
    with pytest.raises(UsageError, match="--model_dir is set by pipelines.run"):
        run.split_trainer_flags(["--model_dir", "x"])


def test_a_child_is_stopped_through_us_and_its_status_returned(tmp_path):
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             "time.sleep(60)\n")

    def stop_us() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before preemption

    threading.Thread(target=stop_us, daemon=True).start()
    started = time.monotonic()
    assert run.run_child([sys.executable, "-c", child]) == 143
    assert time.monotonic() - started < 30
    assert run.run_child([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]) == 137


def test_raw_photos_to_a_trained_model(tmp_path, capfd):
    raw = tmp_path / "raw"
    make_demo_images(str(raw), per_class=10, size=(64, 64), seed=0)
    output = tmp_path / "run"
    argv = ["--input", str(raw), "--output", str(output), "--trainer", "local",
            # preprocess flags
            "--image_size", "64", "--num_shards", "1", "--no_progress",
            # a Beam flag: one process is quicker than a worker pool for 40 images
            "--direct_running_mode", "in_memory",
            # trainer flags: the smallest model, one epoch
            "--model", "linear", "--epochs", "1", "--batch_size", "8"]
    assert run.main(argv) == 0
    streamed = capfd.readouterr().err  # both children write straight to our stderr
    order = [streamed.index(line) for line in (
        "[run] 1/2 preprocess", "[preprocess] done in", "[run] 2/2 train",
        "[trainer] done: 1 epochs", "[run] done: model in")]
    assert order == sorted(order)

    manifest = json.loads((output / "prep" / "manifest.json").read_text())
    assert manifest["accounting"]["images_written"] == 40
    assert manifest["labels"] == ["astronaut", "cat", "coffee", "rocket"]
    model = output / "model"
    assert (model / "saved_model" / "saved_model.pb").exists()
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test" in metrics

    # Rerunning resumes: the complete preprocess output is reused, not redone.
    assert run.main([*argv, "--dry_run"]) == 0
    err = capfd.readouterr().err
    assert "is complete with these settings; reusing it" in err
    assert f"trainer.task --data {output / 'prep'} --model_dir {model}" in err
    # Other settings need --overwrite rather than silently training on stale shards.
    changed = [*argv, "--dry_run"]
    changed[changed.index("64")] = "48"
    assert run.main(changed) == 2
    assert "made with other settings; pass --overwrite" in capfd.readouterr().err
    assert Path(output / "prep" / "manifest.json").exists()


def test_overwrite_resumes_on_the_same_images_and_starts_fresh_on_new_ones(tmp_path, capfd):
    raw, output = tmp_path / "raw", tmp_path / "run"
    make_demo_images(str(raw), per_class=5, size=(32, 32), seed=0)
    argv = ["--input", str(raw), "--output", str(output), "--image_size", "32",
            "--num_shards", "1", "--no_progress", "--direct_running_mode", "in_memory",
            "--model", "linear", "--batch_size", "8"]
    metrics_path = output / "model" / "metrics.json"
    assert run.main([*argv, "--epochs", "1"]) == 0
    first = json.loads(metrics_path.read_text())
    capfd.readouterr()

    # Preprocessed again from the same images: the model resumes where it stopped.
    assert run.main([*argv, "--overwrite", "--epochs", "2"]) == 0
    assert "[trainer] resuming after epoch 1 of 2" in capfd.readouterr().err
    again = json.loads(metrics_path.read_text())
    assert again["resumed_from_epoch"] == 1 and again["epochs"] == 2
    assert again.get("data_fingerprint") == first.get("data_fingerprint")

    # New images under the same names: a new model, not the old one trained on.
    make_demo_images(str(raw), per_class=5, size=(32, 32), seed=1)
    assert run.main([*argv, "--overwrite", "--epochs", "2"]) == 0
    err = capfd.readouterr().err
    assert "resuming" not in err
    assert (f"[trainer] checkpoints in {output / 'model' / 'checkpoints'} were made on other "
            "data or another model (differs: ") in err
    fresh = json.loads(metrics_path.read_text())
    assert fresh["resumed_from_epoch"] == 0 and fresh["epochs"] == 2
    assert [row["epoch"] for row in fresh["history"]] == [1, 2]
    assert fresh["data_fingerprint"] != first["data_fingerprint"]

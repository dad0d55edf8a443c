"""Retraining ticks end to end on crops of real photos: the first tick, a second after new
images arrived (only those are decoded), a tick with nothing new (cheap), a tick killed
while training (the previous model keeps serving) and the tick after it (works)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.retraining import tick as retrain
from tests.support.demo_data import make_demo_images

PER_CLASS = {"first": 20, "second": 6, "third": 3}  # new images per class at each arrival
CLASSES = 4
# Tiny and quick: 32 px, the in-process DirectRunner (no worker start-up for ~100 images),
# one epoch of the linear probe.
FLAGS = ["--image_size", "32", "--num_shards", "1", "--no_progress", "--direct_running_mode",
         "in_memory", "--model", "linear", "--epochs", "1", "--batch_size", "16",
         "--progress", "off"]


def add_images(raw: Path, batch: str, seed: int) -> None:
    """Writes PER_CLASS[batch] new photos per class into raw/<label>/<batch>_*.jpg."""
    staging = raw.parent / f"staging-{batch}"
    make_demo_images(str(staging), per_class=PER_CLASS[batch], size=(40, 48), seed=seed)
    for path in staging.glob("*/*.jpg"):
        (raw / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(raw / path.parent.name / f"{batch}_{path.name}")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def tick(raw: Path, root: Path, *extra: str) -> dict:
    """One tick in this process; returns its retrain.json."""
    before = set((root / "runs").glob("*")) if (root / "runs").exists() else set()
    assert retrain.run(["--input", str(raw), "--root", str(root), *FLAGS, *extra]) == 0
    (folder,) = set((root / "runs").glob("*")) - before
    return read(folder / "retrain.json")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the tick's steps run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tick_while_training(raw: Path, root: Path) -> Path:
    """Starts a tick and SIGKILLs it and all its processes once its trainer has written
    a checkpoint (mid-training: export and metrics.json still to come)."""
    before = set((root / "runs").glob("*"))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.retrain", "--input", str(raw), "--root", str(root),
         *FLAGS, "--epochs", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            started = [p for p in set((root / "runs").glob("*")) - before
                       if (p / "model" / "checkpoints" / "checkpoint").exists()]
            if started:
                for pid in [process.pid, *descendants(process.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.wait()
                return started[0]
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
    pytest.fail(f"the tick never reached training (exit status {process.poll()})")


@pytest.fixture(scope="module")
def ticks(tmp_path_factory):
    """Runs the scenario once; returns every record and current.json at each point."""
    work = tmp_path_factory.mktemp("retrain")
    raw, root = work / "raw", work / "root"
    add_images(raw, "first", seed=0)
    state = {"first": tick(raw, root)}
    state["current_after_first"] = read(root / "current.json")

    add_images(raw, "second", seed=1)
    state["second"] = tick(raw, root)
    state["current_after_second"] = read(root / "current.json")

    started = time.monotonic()
    state["idle"] = tick(raw, root)
    state["idle_wall_s"] = time.monotonic() - started

    add_images(raw, "third", seed=2)
    state["killed_run"] = kill_tick_while_training(raw, root)
    state["current_after_kill"] = read(root / "current.json")
    # Margin 1: any candidate passes; the rule itself is tested in test_retrain.py.
    state["after_kill"] = tick(raw, root, "--gate_margin", "1")
    state["current_after_all"] = read(root / "current.json")
    state["root"] = root
    return state


def test_first_tick_decodes_everything_and_promotes_its_model(ticks):
    first, current = ticks["first"], ticks["current_after_first"]
    total = PER_CLASS["first"] * CLASSES
    assert (first["decoded"], first["reused"], first["images_written"]) == (total, 0, total)
    assert first["status"] == "promoted" and first["reason"].startswith("no current model")
    assert first["baseline"] is None and first["warm_start"]["checkpoints"] is None
    assert current["run_id"] == first["run_id"]
    assert current["labels"] == ["astronaut", "cat", "coffee", "rocket"]
    # The gate's evaluation through the SavedModel agrees with the trainer's own.
    assert first["candidate"]["test"]["accuracy"] == pytest.approx(
        first["candidate"]["trainer"]["test"]["accuracy"], abs=1e-4)


def test_second_tick_decodes_only_the_new_images_and_records_the_gate(ticks):
    first, second = ticks["first"], ticks["second"]
    new = PER_CLASS["second"] * CLASSES
    assert (second["decoded"], second["reused"]) == (new, PER_CLASS["first"] * CLASSES)
    assert second["reused_from_run"] == first["run_id"]
    assert second["drift"]["baseline_run"] == first["run_id"]
    assert second["drift"]["baseline"].endswith("stats/statistics.pb")
    assert second["warm_start"]["checkpoints"] == ticks["current_after_first"]["checkpoints"]
    # Both models on the same test images: the new run's test split.
    assert second["candidate"]["test"]["num_examples"] == second["splits"]["test"]
    assert second["baseline"]["test"]["num_examples"] == second["splits"]["test"]
    assert second["baseline"]["run_id"] == first["run_id"]
    rule = second["settings"]["gate"]
    passed = (second["candidate"]["test"]["accuracy"]
              >= second["baseline"]["test"]["accuracy"] - rule["margin"])
    assert second["promoted"] is passed and second["status"] == (
        "promoted" if passed else "rejected"), second["reason"]
    expected = second["run_id"] if passed else first["run_id"]
    assert ticks["current_after_second"]["run_id"] == expected


def test_a_tick_without_new_data_does_nothing_costly(ticks):
    idle, root = ticks["idle"], ticks["root"]
    assert idle["status"] == "no_new_data" and idle["promoted"] is False
    assert idle["same_as_run"] == ticks["second"]["run_id"] and idle["decoded"] == 0
    assert "unchanged" in idle["reason"]
    assert sorted(p.name for p in (root / "runs" / idle["run_id"]).iterdir()) == ["retrain.json"]
    assert idle["timings"]["total_s"] < 5, idle["timings"]  # a listing, no Beam, no training
    print(f"no-new-data tick: {idle['timings']['total_s']}s in the tick, "
          f"{ticks['idle_wall_s']:.2f}s wall")


def test_a_killed_tick_leaves_the_previous_model_serving_and_the_next_tick_works(ticks):
    killed, current = ticks["killed_run"], ticks["current_after_kill"]
    assert not (killed / "retrain.json").exists()
    assert not (killed / "model" / "metrics.json").exists()  # killed before the end
    assert current == ticks["current_after_second"]
    assert (Path(current["saved_model"]) / "saved_model.pb").exists()
    assert (Path(current["model_dir"]) / "metrics.json").exists()

    after = ticks["after_kill"]
    # The killed tick's preprocess output was complete: everything is reused from it.
    assert after["reused_from_run"] == killed.name
    assert after["decoded"] == 0 and after["reused"] == after["images_written"] == sum(
        PER_CLASS.values()) * CLASSES
    assert after["status"] == "promoted"
    final = ticks["current_after_all"]
    assert final["run_id"] == after["run_id"] and final["previous_run_id"] == current["run_id"]
    assert not list(ticks["root"].glob("current.json.tmp*"))

    import tensorflow as tf

    serve = tf.saved_model.load(final["saved_model"]).signatures["serving_default"]
    image = next((ticks["root"].parent / "raw" / "cat").glob("third_*.jpg")).read_bytes()
    label = serve(image_bytes=tf.constant([image]))["label"].numpy()[0].decode()
    assert label in final["labels"]

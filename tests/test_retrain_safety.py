"""One retraining tick per root, and promotion as a compare-and-swap of current.json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.contract import ownership
from pipelines.retraining import tick as retrain
from tests.support.demo_data import make_demo_images

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--image_size", "16", "--num_shards", "1", "--no_progress", "--direct_running_mode",
         "in_memory", "--model", "linear", "--epochs", "1", "--batch_size", "16",
         "--progress", "off"]


def _claim(root: Path, run_id: str) -> ownership.OutputClaim:
    return ownership.acquire(str(root / retrain.TICK_CLAIM), ownership.ClaimRecord(
        run_id=run_id, entries=(), created_at=time.time()))


def test_a_second_tick_on_a_held_root_is_refused_and_touches_nothing(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "root"
    make_demo_images(str(raw), per_class=2, size=(20, 24))
    held = _claim(root, "running-tick")
    try:
        assert retrain.run(["--input", str(raw), "--root", str(root), *FLAGS]) == 2
        err = capsys.readouterr().err
        assert "running-tick" in err and "Traceback" not in err, err
        assert sorted(p.name for p in root.iterdir()) == [retrain.TICK_CLAIM]
    finally:
        held.release()
    # Its holder died: the claim is stale, and a tick takes it over (and removes it after).
    with _claim(root, "next") as claim:
        assert claim.run_id == "next"


def test_a_released_tick_claim_is_removed_with_its_lock(tmp_path):
    root = tmp_path / "root"
    claim = _claim(root, "a")
    claim.release(remove=True)
    assert not (root / retrain.TICK_CLAIM).exists()
    with _claim(root, "b"):  # free again at once
        pass


def _pointer(run_id: str) -> dict:
    return {"run_id": run_id, "saved_model": f"/models/{run_id}"}


def test_promotion_never_overwrites_a_newer_promotion_locally(tmp_path):
    root = str(tmp_path)
    retrain.swap_current(root, _pointer("a"), None)
    with pytest.raises(retrain.BaselineChanged):
        retrain.swap_current(root, _pointer("b"), None)  # gated against "no model"
    retrain.swap_current(root, _pointer("b"), "a")
    with pytest.raises(retrain.BaselineChanged):
        retrain.swap_current(root, _pointer("c"), "a")  # "b" was promoted meanwhile
    assert json.loads((tmp_path / "current.json").read_text())["run_id"] == "b"


@pytest.fixture(scope="module")
def gcs():
    from tests.support.gcs_emulator import GcsEmulator

    with GcsEmulator() as emulator:
        emulator.create_bucket("retrain")
        yield emulator


def test_promotion_is_a_generation_compare_and_swap_on_gcs(gcs, monkeypatch):
    root = "gs://retrain/root"
    retrain.swap_current(root, _pointer("a"), None)
    assert retrain.read_current(root)["run_id"] == "a"
    real_write = ownership.gcs_write

    def another_tick_promotes_first(path, data, if_generation_match):
        real_write(path, json.dumps(_pointer("other")).encode(), if_generation_match=None)
        return real_write(path, data, if_generation_match)

    # current.json is replaced between our read (it named "a") and our write.
    monkeypatch.setattr(ownership, "gcs_write", another_tick_promotes_first)
    with pytest.raises(retrain.BaselineChanged):
        retrain.swap_current(root, _pointer("b"), "a")
    monkeypatch.undo()
    assert retrain.read_current(root)["run_id"] == "other"


def _record(root: Path, run_id: str, **fields) -> None:
    folder = root / "runs" / run_id
    folder.mkdir(parents=True)
    (folder / retrain.RECORD).write_text(json.dumps({"run_id": run_id, **fields}))


def test_a_kill_between_the_promoting_record_and_the_swap_tells_a_consistent_story(tmp_path):
    _record(tmp_path, "1-first", status="promoted", fingerprint="f1")
    _record(tmp_path, "2-killed", status="promoting", fingerprint="f2")
    # current.json still names the first run: the second was never served, and its
    # fingerprint must not make the next tick skip its data.
    current = {"run_id": "1-first"}
    assert retrain.last_finished_record(str(tmp_path), current)["run_id"] == "1-first"
    # Killed after the swap, before the final record: it does serve, so it counts.
    current = {"run_id": "2-killed"}
    last = retrain.last_finished_record(str(tmp_path), current)
    assert last["run_id"] == "2-killed" and last["status"] == "promoted"


def test_two_concurrent_ticks_one_trains_and_current_names_a_gated_model(tmp_path):
    raw, root = tmp_path / "raw", tmp_path / "root"
    make_demo_images(str(raw), per_class=6, size=(20, 24))
    command = [sys.executable, "-m", "pipelines.retrain", "--input", str(raw), "--root",
               str(root), *FLAGS]
    ticks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(tick.wait(timeout=600), tick.stderr.read()) for tick in ticks]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by" in loser, loser
    records = [json.loads(p.read_text()) for p in root.glob("runs/*/retrain.json")]
    assert [r["status"] for r in records] == ["promoted"]
    current = json.loads((root / "current.json").read_text())
    assert current["run_id"] == records[0]["run_id"]
    assert not (root / retrain.TICK_CLAIM).exists()

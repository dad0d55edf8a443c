"""Killed runs: SIGKILL the preprocessing command while it works, again and again, into one
output folder. No kill may leave a manifest.json (the only mark of a complete output),
and the rerun, with the same command and no flags added, cleans up and writes shards
byte-identical to a run that was never interrupted.

Kills land at moments picked by watching the output, some with a seeded random delay on
top: while decoding (spill files appear), at the first shard, while shards are written,
and while finalizing (the dead-letter file appears, the manifest comes right after).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import preprocess
from pipelines.contract import manifest as manifest_lib
from pipelines.contract import ownership
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing import output as output_lib
from pipelines.preprocessing.options import PreprocessConfig
from tests import corpus

ARGS = ["--image_size", "32", "--num_shards", "3", "--no_progress", *corpus.ERROR_BUDGET_ARGS]
SEED = 20240611
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """~150 small files in 3 classes, with duplicates and broken files."""
    root = tmp_path_factory.mktemp("raw")
    corpus.write_corpus(root)
    for index in range(120):
        folder = root / ("cat", "dog", "bird")[index % 3]
        folder.mkdir(exist_ok=True)
        image = corpus.noise(36, 48, 1000 + index)
        folder.joinpath(f"n{index:03d}.jpg").write_bytes(corpus.encode(image, "JPEG", quality=80))
    return root


def _command(raw: Path, out: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.preprocess", "--input", str(raw), "--output",
            str(out), *ARGS, "--direct_running_mode", mode]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    # Own session: the kill reaches the runner and every worker it forked, as when a VM
    # or container dies.
    with log.open("ab") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_when(process: subprocess.Popen, ready, timeout_s: float = RUN_TIMEOUT_S) -> bool:
    """SIGKILLs the process group once `ready()`; returns False if it exited first."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail("the run neither finished nor reached the kill point")
    return False


def _shard_bytes(out: Path) -> dict[str, bytes]:
    manifest = read_manifest(str(out)).to_json()
    return {s["path"]: (out / s["path"]).read_bytes()
            for entry in manifest["splits"].values() for s in entry["shards"]}


class _After:
    """True `delay_s` after this run first wrote a file matching `pattern` under `folder`
    (files an earlier, killed run left there do not count)."""

    def __init__(self, folder: Path, pattern: str, delay_s: float = 0.0):
        self._folder, self._pattern, self._delay_s = folder, pattern, delay_s
        self._since = time.time()
        self._seen: float | None = None

    def __call__(self) -> bool:
        if self._seen is None and any(p.stat().st_mtime >= self._since
                                      for p in self._folder.glob(self._pattern)):
            self._seen = time.monotonic()
        return self._seen is not None and time.monotonic() - self._seen >= self._delay_s


def test_killed_runs_never_look_complete_and_the_rerun_is_exact(raw, tmp_path):
    reference = tmp_path / "reference"
    assert preprocess.run(_command(raw, reference, "in_memory")[3:]) == 0

    out, log = tmp_path / "out", tmp_path / "runs.log"
    rng = random.Random(SEED)
    # (where, runner mode, trigger): each run starts on what the previous kill left.
    # Startup (TensorFlow, Beam) writes nothing, so kills are timed from the first write.
    # On 2 cores the first spill write comes ~1.1 s before the manifest and ~0.5 s before
    # the first shard (decoding on threads); a decoding kill must land inside that.
    kills = [
        ("decoding, random", "in_memory", "_tmp/*/*.spill", rng.uniform(0, 0.3)),
        ("first shard, workers", "multi_processing", "data/*", 0.0),
        ("writing, random", "in_memory", "data/*", rng.uniform(0, 0.4)),
        ("finalizing", "in_memory", "errors/*", 0.0),
    ]
    outcomes = []
    for name, mode, pattern, delay_s in kills:
        trigger = _After(out, pattern, delay_s)
        process = _start(_command(raw, out, mode), log)
        begun = time.monotonic()
        _kill_when(process, trigger)
        complete = (out / "manifest.json").exists()
        if complete:
            # It got to write its manifest (before the kill point, or the kill landed in
            # the last instants): then it must be whole and exact.
            assert process.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
            assert _shard_bytes(out) == _shard_bytes(reference)
        else:
            with pytest.raises(FileNotFoundError):
                read_manifest(str(out)).to_json()
        outcomes.append((name, "completed" if complete else "incomplete",
                         round(time.monotonic() - begun, 1), sorted(p.name for p in out.iterdir())))
        if complete:
            shutil.rmtree(out)  # the next run would need --overwrite
    print("\n".join(f"{name}: killed after {took}s, {state}, left {left}"
                    for name, state, took, left in outcomes))
    # Decoding and first-shard kills always cut a run short; the later ones may land
    # after the manifest on a fast machine, which is checked above as complete and exact.
    assert sum(state == "incomplete" for _, state, _, _ in outcomes) >= 2, outcomes

    # The same command again: it must clean whatever the kills left, alone.
    rerun = subprocess.run(_command(raw, out, "multi_processing"), capture_output=True,
                           text=True, timeout=RUN_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert _shard_bytes(out) == _shard_bytes(reference)
    for relative in ("errors/errors.jsonl", "index/images.jsonl"):
        assert (out / relative).read_bytes() == (reference / relative).read_bytes(), relative
    first, again = read_manifest(str(reference)).to_json(), read_manifest(str(out)).to_json()
    assert again["accounting"] == first["accounting"] and again["splits"] == first["splits"]
    data_files = sorted(p.name for p in (out / "data").iterdir())
    assert data_files == sorted(Path(p).name for p in _shard_bytes(out)), data_files
    assert not (out / "_tmp").exists() and not (out / "_IN_PROGRESS").exists()


def test_leftovers_of_a_kill_during_cleanup_are_reclaimed_only_beside_our_claim(tmp_path):
    """Killed inside prepare_output after the old manifest was deleted: the claim, written
    first, proves the folders are ours. Without it the same names are the user's."""
    out = tmp_path / "out"
    for name in ("data", "errors", "index", "stats", "transform_output"):
        (out / name).mkdir(parents=True)
        (out / name / "leftover").write_text("from a killed run")
    with pytest.raises(ownership.OutputRefused, match="not an output of this tool"):
        output_lib.prepare_output(PreprocessConfig(output=str(out), input="unused"))
    assert len(list(out.rglob("leftover"))) == 5
    (out / manifest_lib.IN_PROGRESS).write_bytes(ownership.ClaimRecord(
        run_id="killed", entries=manifest_lib.OUTPUT_ENTRIES, created_at=0.0).to_bytes())
    claim = output_lib.prepare_output(PreprocessConfig(output=str(out), input="unused"))
    claim.release()
    assert sorted(p.name for p in out.iterdir()) == [manifest_lib.IN_PROGRESS]

"""tf.Transform in a second process (local runs): same output as in the pipeline, and
its failures fail the run with the reason.

The production path needs a process that has not loaded TensorFlow (pytest has), so
these tests drive it in fresh Python processes.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow  # noqa: F401 - loaded, as in every test process here
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.contract import transform_output
from pipelines.contract.manifest import read_manifest
from pipelines.local import analysis_process
from tests import stats_outputs


def run_python(code: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def analysis_outcome(*, setup: str = "", before_submit: str = "", instances: str = "[]",
                     timeout_s: float = 60) -> dict:
    """Starts an AnalysisProcess in a fresh process, hands it `instances` and waits:
    {"outcome": "no error" or the AnalysisFailed message, "left": work folder remains}."""
    done = run_python(f"""
        import json, os, time
        from pipelines.local import analysis_process
        from pipelines.stats import analyzers
        {setup}
        analysis = analysis_process.AnalysisProcess.start()
        {before_submit}
        try:
            analysis.submit({instances})
            analysis.wait()
            outcome = "no error"
        except analysis_process.AnalysisFailed as err:
            outcome = str(err)
        analysis.close()
        print(json.dumps({{"outcome": outcome, "left": os.path.exists(analysis.work_dir)}}))
    """, timeout_s=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """(the command's output, run in a fresh process, where the analysis runs in a second
    process; the same corpus and flags run in this process, where it runs in the
    pipeline; whether the fresh process ever loaded TensorFlow)."""
    raw, _ = stats_outputs.raw_corpus(tmp_path_factory)
    in_pipeline = stats_outputs.base_output(tmp_path_factory)
    out = tmp_path_factory.mktemp("analysis-process") / "out"
    argv = ["--input", str(raw), "--output", str(out), *stats_outputs.ARGS]
    done = run_python(f"""
        import json, sys
        from pipelines import preprocess
        code = preprocess.run({argv!r})
        print(json.dumps({{"code": code, "tensorflow": "tensorflow" in sys.modules}}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-3000:]
    # No TensorFlow C++ log lines ("E0000 ... failed call to cuInit" on a machine without
    # a GPU) reach the user's terminal: only the command's own lines.
    assert not re.search(r"^[IWE]\d{4} ", done.stderr, re.MULTILINE), done.stderr[-3000:]
    return out, in_pipeline, result["tensorflow"]


def test_the_command_analyzes_in_a_second_process_and_never_loads_tensorflow(outputs):
    out, in_pipeline, tensorflow_loaded = outputs
    assert read_manifest(str(out)).timings["tf_transform_ran"] == "in a second process"
    assert read_manifest(str(in_pipeline)).timings["tf_transform_ran"] == "in the pipeline"
    assert not tensorflow_loaded  # tf.Transform was the only reason to load it


def test_second_process_output_equals_the_in_pipeline_output(outputs):
    out, in_pipeline, _ = outputs
    apart = transform_output.normalization_from_transform_output(str(out / "transform_output"))
    inside = transform_output.normalization_from_transform_output(
        str(in_pipeline / "transform_output"))
    np.testing.assert_allclose(apart["mean"], inside["mean"], rtol=1e-6)
    np.testing.assert_allclose(apart["std"], inside["std"], rtol=1e-6)
    assert apart["label_frequencies"] == inside["label_frequencies"]
    assert apart["label_frequencies"]  # the corpus has train labels: not vacuous
    assert sorted(p.name for p in (out / "transform_output").rglob("*")) == sorted(
        p.name for p in (in_pipeline / "transform_output").rglob("*"))
    # Where the analysis ran changes nothing else: the same shards, byte for byte.
    shards = sorted(path.relative_to(out) for path in (out / "data").rglob("*.tfrecord"))
    assert shards
    for shard in shards:
        assert (out / shard).read_bytes() == (in_pipeline / shard).read_bytes(), shard


def test_a_failing_analysis_fails_with_its_traceback_and_cleans_up():
    result = analysis_outcome(instances='[b"not a tf.Example"]', timeout_s=240)
    assert "wrote no output: it failed" in result["outcome"]
    assert "Traceback" in result["outcome"]  # the child's own traceback reaches the user
    assert not result["left"]


def test_a_dead_analysis_process_fails_the_wait_instead_of_hanging():
    wait_for_tensorflow_lines = (  # then kill it, as the OOM killer would
        "log = os.path.join(analysis.work_dir, 'stderr.log')\n"
        "        while not (os.path.exists(log) and os.path.getsize(log)): time.sleep(0.05)\n"
        "        analysis._process.kill()")
    outcome = analysis_outcome(before_submit=wait_for_tensorflow_lines)["outcome"]
    assert "exit code -9" in outcome and "wrote no output" in outcome
    # Its stderr (TensorFlow's C++ lines, kept off the terminal) is the only trace a kill
    # leaves: the error carries its tail.
    assert "its stderr ended" in outcome


@pytest.mark.parametrize("args", [
    ["--runner", "DirectRunner", "--direct_running_mode", "multi_processing"],
    ["--runner", "DataflowRunner"],
    ["--runner", "DirectRunner"],  # this process has loaded TensorFlow: nothing to hide
])
def test_only_local_in_memory_runs_without_tensorflow_use_it(args):
    assert "tensorflow" in sys.modules
    assert not analysis_process.useful(PipelineOptions(args))
    with analysis_process.started(PipelineOptions(args)) as token:
        assert token is None


def test_a_process_running_other_threads_is_not_forked():
    done = run_python("""
        import threading
        from apache_beam.options.pipeline_options import PipelineOptions
        from pipelines.local import analysis_process
        options = PipelineOptions(["--runner", "DirectRunner"])
        alone = analysis_process.useful(options)
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()  # as a notebook kernel has
        print(alone, analysis_process.useful(options))
        stop.set()
    """, timeout_s=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "False"]


def test_work_folders_of_killed_runs_are_removed_by_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folders = {name: tmp_path / f"imagebeam-analysis-{name}"
               for name in ("abandoned", "live", "fresh", "unlocked")}
    for name, folder in folders.items():
        (folder / "tmp").mkdir(parents=True)
        if name != "unlocked":
            lock = folder / ".lock"
            lock.touch()
            if name != "fresh":
                os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with open(folders["live"] / ".lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running analysis holds it
        analysis_process.remove_abandoned_work_dirs()
    assert not folders["abandoned"].exists()
    assert all(folders[name].exists() for name in ("live", "fresh", "unlocked"))


def test_a_failure_before_go_reaches_the_user_with_its_traceback():
    outcome = analysis_outcome(
        # the fork inherits the patch: the child fails while building its pipeline
        setup="def broken(self, instances): raise ZeroDivisionError('tracing failed')\n"
              "        analyzers.AnalyzeInstances.expand = broken",
        before_submit="time.sleep(3)  # long before the instances come")["outcome"]
    assert "ZeroDivisionError: tracing failed" in outcome and "Traceback" in outcome


def test_the_child_dies_with_a_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pipelines.local import analysis_process
        analysis = analysis_process.AnalysisProcess.start()
        print(analysis._process.pid, analysis.work_dir, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    child_pid, work_dir = parent.stdout.readline().split()
    os.kill(parent.pid, signal.SIGKILL)  # no cleanup runs in the parent
    parent.wait()
    deadline = time.monotonic() + 20
    while Path(f"/proc/{child_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child_pid}").exists(), "the analysis process outlived its parent"
    shutil.rmtree(work_dir, ignore_errors=True)


def test_gs_output_gets_the_second_process_transform(outputs, tmp_path_factory):
    """The second process writes locally; the pipeline copies its output into the bucket
    (tf.Transform's own writer could not reach the emulator)."""
    from apache_beam.io.filesystems import FileSystems

    from tests.support.gcs_emulator import GcsEmulator

    _, in_pipeline, _ = outputs
    raw, _ = stats_outputs.raw_corpus(tmp_path_factory)
    with GcsEmulator() as emulator:
        emulator.create_bucket("images")
        emulator.upload_folder(str(raw), "gs://images/raw")
        argv = ["--input", "gs://images/raw", "--output", "gs://images/prep",
                *stats_outputs.ARGS]
        done = run_python(f"""
            from pipelines import preprocess
            raise SystemExit(preprocess.run({argv!r}))
        """)
        assert done.returncode == 0, done.stderr[-3000:]
        manifest = read_manifest("gs://images/prep").to_json()
        assert manifest["timings"]["tf_transform_ran"] == "in a second process"
        root = "gs://images/prep/transform_output/"
        copied = {m.path[len(root):]: m.size_in_bytes
                  for m in FileSystems.match([root + "**"])[0].metadata_list}
        local = in_pipeline / "transform_output"
        assert set(copied) == {str(p.relative_to(local)) for p in local.rglob("*")
                               if p.is_file()}
        vocabulary = "transform_fn/assets/labels"
        with FileSystems.open(root + vocabulary) as handle:
            assert handle.read() == (local / vocabulary).read_bytes()

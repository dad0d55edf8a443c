"""Training beyond one device, on CPU: MultiWorkerMirroredStrategy with two local workers
on loopback ports, and MirroredStrategy over two logical CPU devices.

Each path trains, is stopped by SIGTERM after its first checkpoint, restarts and resumes,
finishes, and exports a model that serves raw image bytes. Workers read disjoint shards:
every train record once per epoch across them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import tensorflow as tf

from pipelines.contract import records
from pipelines.contract.manifest import read_manifest
from trainer import input as input_lib

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "small_cnn", "--batch_size", "16", "--progress", "off",
         "--steps_per_execution", "2"]
TIMEOUT_S = 300


def _sha256s(dataset: tf.data.Dataset) -> list[bytes]:
    return [records.parse_example(raw.numpy())[records.SHA256][0] for raw in dataset]


@pytest.mark.parametrize("num_workers", [1, 2, 3])  # photo_prep has 2 train shards
def test_each_epoch_every_train_record_once_across_workers(photo_prep, num_workers):
    spec = input_lib.DataSpec.from_manifest(str(photo_prep.output),
                                            read_manifest(str(photo_prep.output)))
    everything = Counter(_sha256s(tf.data.TFRecordDataset([s.path for s in spec.splits["train"]])))
    for epoch in (0, 1):
        seen: Counter[bytes] = Counter()
        for worker in range(num_workers):
            mine = _sha256s(input_lib.worker_epoch_records(spec, "train", 0, epoch, worker,
                                                           num_workers))
            assert len(mine) == input_lib.worker_examples(spec, "train", worker, num_workers)
            seen.update(mine)
        assert seen == everything


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(data: Path, model_dir: Path, epochs: int, log: Path) -> list[subprocess.Popen]:
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "trainer.task", "--data", str(data), "--model_dir",
             str(model_dir), "--epochs", str(epochs), *FLAGS],
            cwd=REPO, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT))
    return workers


def _wait_for_checkpoint(model_dir: Path, processes: list[subprocess.Popen], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (model_dir / "checkpoints" / "checkpoint").exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            pytest.fail(f"no checkpoint was written:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _serves(model_dir: Path, image: Path, labels: list[str]) -> None:
    serve = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    outputs = serve(image_bytes=tf.constant([image.read_bytes()]))
    assert outputs["label"].numpy()[0].decode() in labels
    assert abs(float(tf.reduce_sum(outputs["probabilities"])) - 1.0) < 1e-4


def test_two_local_workers_train_resume_after_sigterm_and_export(photo_prep, tmp_path):
    model_dir, log = tmp_path / "model", tmp_path / "workers.log"
    workers = _start_workers(photo_prep.output, model_dir, epochs=4, log=log)
    try:
        _wait_for_checkpoint(model_dir, workers, log)
        workers[1].send_signal(signal.SIGTERM)  # a preempted worker
        assert workers[1].wait(timeout=TIMEOUT_S) == 143, log.read_text()[-3000:]
        # Its peer waits in a collective for a step that will not come: a cluster restarts
        # as a whole (Vertex AI restarts every replica of a job).
        workers[0].kill()
        workers[0].wait()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    restarted = _start_workers(photo_prep.output, model_dir, epochs=4, log=log)
    codes = [worker.wait(timeout=TIMEOUT_S) for worker in restarted]
    assert codes == [0, 0], log.read_text()[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["replicas"] == 2
    assert metrics["resumed_from_epoch"] >= 1 and metrics["epochs"] == 4
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]
    assert not list(model_dir.rglob("workertemp_*")), "the other worker's folders remain"
    _serves(model_dir, next(photo_prep.raw.glob("*/*.jpg")), metrics["labels"])


def test_mirrored_over_two_cpu_devices_trains_resumes_and_exports(photo_prep, tmp_path):
    model_dir, log = tmp_path / "model", tmp_path / "train.log"
    command = [sys.executable, "-m", "trainer.task", "--data", str(photo_prep.output),
               "--model_dir", str(model_dir), "--epochs", "3", "--cpu_replicas", "2", *FLAGS]
    first = subprocess.Popen(command, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT)
    try:
        _wait_for_checkpoint(model_dir, [first], log)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=TIMEOUT_S) == 143, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    again = subprocess.run(command, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT,
                           timeout=TIMEOUT_S)
    assert again.returncode == 0, log.read_text()[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["workers"] == 1
    assert metrics["resumed_from_epoch"] >= 1 and metrics["epochs"] == 3
    _serves(model_dir, next(photo_prep.raw.glob("*/*.png")), metrics["labels"])


def test_a_global_batch_that_does_not_split_over_the_replicas_is_a_usage_error(photo_prep,
                                                                                tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "trainer.task", "--data", str(photo_prep.output), "--model_dir",
         str(tmp_path / "model"), "--epochs", "1", "--cpu_replicas", "2", "--batch_size", "15"],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 2 and "multiple of the 2 replicas" in done.stderr, done.stderr

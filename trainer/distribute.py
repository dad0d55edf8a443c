"""Where the model runs: distribution strategy, mixed precision and XLA.

- TF_CONFIG naming more than one task -> MultiWorkerMirroredStrategy (it must be
  created before any other TensorFlow op, so `setup` is the first thing `train` does);
- several local GPUs (or `cpu_replicas` > 1 logical CPU devices) -> MirroredStrategy;
- otherwise the default strategy (one GPU, or the CPU).
Several replicas train through `trainer.loop` (Keras' fit does not run there).
Mixed precision (mixed_float16) and XLA are on by default only on a GPU: on a CPU
float16 is slower than float32 and XLA's compile time is not paid back. With several
replicas XLA is off: the replicas' steps and their all-reduce are not compiled as one
program by `strategy.run`, and that combination is untested here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The chosen strategy and the choices made with it."""

    strategy: tf.distribute.Strategy
    mixed_precision: bool
    jit: bool
    worker_index: int  # this process among the workers (0 without TF_CONFIG)
    num_workers: int

    @property
    def is_chief(self) -> bool:
        """The one worker that writes the shared outputs (metrics, SavedModel)."""
        return self.worker_index == 0

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def cluster_position(environ: Mapping[str, str]) -> tuple[int, int]:
    """(worker_index, num_workers) from TF_CONFIG; the chief (or worker 0) is index 0."""
    config = json.loads(environ.get("TF_CONFIG") or "{}")
    cluster = config.get("cluster", {})
    task = config.get("task", {})
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    num_workers = max(1, chiefs + workers)
    kind, index = task.get("type", "chief" if chiefs else "worker"), int(task.get("index", 0))
    worker_index = index if kind == "chief" else index + chiefs
    return worker_index, num_workers


def _resolve(switch: str, on_gpu: bool) -> bool:
    return switch == "on" or (switch == "auto" and on_gpu)


def setup(mixed_precision: str = "auto", jit: str = "auto",
          environ: Mapping[str, str] | None = None, cpu_replicas: int = 1) -> Runtime:
    """Picks the strategy and sets the global Keras dtype policy. Call once, first."""
    environ = os.environ if environ is None else environ
    worker_index, num_workers = cluster_position(environ)
    if num_workers > 1:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        strategy = tf.distribute.MirroredStrategy(
            [device.name for device in tf.config.list_logical_devices("CPU")])
    else:
        gpus = tf.config.list_physical_devices("GPU")
        strategy = (tf.distribute.MirroredStrategy() if len(gpus) > 1
                    else tf.distribute.get_strategy())
    gpus = tf.config.list_physical_devices("GPU")
    # float16 pays off from Volta (compute capability 7.0) on; older GPUs only lose accuracy.
    fast_fp16 = any(
        tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)) >= (7, 0)
        for gpu in gpus
    )
    use_mixed = _resolve(mixed_precision, fast_fp16)
    use_jit = _resolve(jit, bool(gpus))
    if use_jit and strategy.num_replicas_in_sync > 1:
        log.warning("XLA is off with %d replicas: the distributed loop is not compiled with "
                    "XLA (see trainer.loop)", strategy.num_replicas_in_sync)
        use_jit = False
    keras.config.set_dtype_policy("mixed_float16" if use_mixed else "float32")
    log.info("strategy %s, %d replica(s), worker %d/%d, mixed precision %s, XLA %s",
             type(strategy).__name__, strategy.num_replicas_in_sync, worker_index, num_workers,
             use_mixed, use_jit)
    return Runtime(strategy, use_mixed, use_jit, worker_index, num_workers)

"""`python -m trainer.task --data URI --model_dir URI ...`: train, evaluate, export.

Flags: `trainer/config.py`. Exit status 0 done, 2 usage error, 143 stopped by SIGTERM
(run the same command again to resume).

The terminal shows our `[trainer]` lines and Keras' progress. TensorFlow's C++ start-up
lines (oneDNN, CUDA probing, and `failed call to cuInit` on a machine without a GPU) are
not stopped by TF_CPP_MIN_LOG_LEVEL (the first come before absl's logging is set up, the
last is an error): they go to a temporary file, kept and named only if TensorFlow fails to
start. After start-up, TF_CPP_MIN_LOG_LEVEL (2 unless set: errors only) applies; set it to
0 or 1 to see the start-up lines, and TensorFlow's INFO or WARNING lines, on the terminal.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from trainer import quiet
from trainer.config import TrainConfig, UsageError, parse_args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    logging.basicConfig(level=logging.WARNING, format="[trainer] %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with quiet.native_stderr(os.environ, "TensorFlow's start-up messages"):
        import tensorflow as tf

        from trainer import train  # TensorFlow loads only for a valid command

        # CUDA is probed (cuInit) when devices are first listed. Physical devices can be
        # listed before the runtime starts, so distribute.setup can still create a
        # MultiWorkerMirroredStrategy first.
        tf.config.list_physical_devices("GPU")
    return _train(config, train)


def _train(config: TrainConfig, train: ModuleType) -> int:
    try:
        metrics = train.run(config)
    except (FileNotFoundError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except train.Preempted as err:
        print(f"[trainer] {err}; rerun the same command to resume", file=sys.stderr)
        return 143
    print(f"[trainer] done: {metrics['epochs']} epochs, validation {metrics.get('validation')}, "
          f"test {metrics.get('test')}, {metrics['input_images_per_s']} images/s -> "
          f"{config.saved_model_dir}", file=sys.stderr)
    for warning in metrics.get("warnings", []):
        print(f"[trainer] WARNING: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

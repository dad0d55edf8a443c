"""`python -m trainer.task --data URI --model_dir URI ...`: train, evaluate, export.

Flags: `trainer/config.py`. Exit status 0 done, 2 usage error, 143 stopped by SIGTERM
(run the same command again to resume).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

import logging
import sys
from collections.abc import Sequence

from trainer.config import UsageError, parse_args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    logging.basicConfig(level=logging.WARNING, format="[trainer] %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from trainer import train  # TensorFlow loads only for a valid command

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
    return 0


if __name__ == "__main__":
    sys.exit(main())

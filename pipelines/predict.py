"""Image files -> predictions of a SavedModel, on Beam (DirectRunner here, Dataflow at scale).

    python -m pipelines.predict --model model/saved_model --input photos/ --output preds/
    python -m pipelines.predict --model gs://b/retrain/current.json --labels new.csv \
        --output gs://b/preds --runner DataflowRunner ...

See docs/prediction.md; the command is `pipelines.prediction.command.run`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads; workers inherit it

import sys  # noqa: E402

from pipelines.prediction.command import run  # noqa: E402


def main() -> int:
    """`python -m pipelines.predict` and `imagebeam predict`: the exit code of `run`."""
    return run()


if __name__ == "__main__":
    sys.exit(main())

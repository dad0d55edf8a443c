"""`python -m pipelines.retrain`: one scheduled retraining tick (`pipelines.retraining.tick`).

    python -m pipelines.retrain --input gs://bucket/raw --root gs://bucket/retrain \
        [--trainer local|vertex] [--gate_margin 0.02] [preprocess, Beam and trainer flags]
"""

from pipelines.retraining.tick import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()

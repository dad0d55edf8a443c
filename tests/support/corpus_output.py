"""A real preprocess output of the test corpus (`tests.corpus`): every encoding, a
duplicate, a multi-label image, broken files; made by the command users run, once per
test session (the modules that read it share it: each run costs seconds)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests import corpus


def preprocess_corpus(factory: pytest.TempPathFactory, num_shards: int = 3,
                      image_size: str = "32,48") -> str:
    """The output folder of `python -m pipelines.preprocess` over the corpus. Readers
    only: a test that changes it works on a copy."""
    root = factory.getbasetemp() / f"corpus-output-{num_shards}-{image_size}"
    output = root / "out"
    if not (output / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)  # an earlier attempt's leftovers
        raw = root / "raw"
        corpus.write_corpus(raw)
        subprocess.run(
            [sys.executable, "-m", "pipelines.preprocess", "--input", str(raw), "--output",
             str(output), "--image_size", image_size, "--num_shards", str(num_shards),
             "--no_progress", *corpus.ERROR_BUDGET_ARGS],
            check=True, capture_output=True)
    return str(output)

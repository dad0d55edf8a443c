"""Real preprocess outputs for the statistics tests, made once per test session.

`base_output`: tests/corpus.py's corpus (every encoding, duplicates, a label conflict,
broken files) stored as PNG, so decoding a shard gives back exactly the pixels the
analyzers summed. `rerun_output`: the same corpus again with `--baseline_stats` pointing
at the first run's statistics (an identical rerun: drift must stay quiet).
Shared by test_statistics, test_analyzers, test_drift and test_report, so the session
pays for two pipeline runs, not one per module.
"""

from __future__ import annotations

from pathlib import Path

from pipelines import preprocess
from tests import corpus

ARGS = ["--image_size", "32,48", "--image_format", "png", "--num_shards", "2", "--no_progress",
        *corpus.ERROR_BUDGET_ARGS]
_made: dict[str, Path] = {}


def raw_corpus(tmp_path_factory) -> tuple[Path, dict]:
    if "raw" not in _made:
        root = tmp_path_factory.mktemp("stats-raw")
        _made["raw"] = root
        _made["expected"] = corpus.write_corpus(root)
    return _made["raw"], _made["expected"]


def base_output(tmp_path_factory) -> Path:
    if "base" not in _made:
        raw, _ = raw_corpus(tmp_path_factory)
        out = tmp_path_factory.mktemp("stats-base") / "out"
        assert preprocess.run(["--input", str(raw), "--output", str(out), *ARGS]) == 0
        _made["base"] = out
    return _made["base"]


def rerun_output(tmp_path_factory) -> Path:
    if "rerun" not in _made:
        raw, _ = raw_corpus(tmp_path_factory)
        baseline = base_output(tmp_path_factory) / "stats" / "statistics.pb"
        out = tmp_path_factory.mktemp("stats-rerun") / "out"
        assert preprocess.run(["--input", str(raw), "--output", str(out), *ARGS,
                               "--baseline_stats", str(baseline)]) == 0
        _made["rerun"] = out
    return _made["rerun"]

"""Drift: a planted class shift is flagged; an identical rerun stays quiet."""

import json
from types import SimpleNamespace

import pytest

from pipelines import preprocess
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing.options import UsageError
from pipelines.preprocessing.transforms import ImageMeta
from pipelines.stats import drift
from pipelines.stats import feature_stats as stats_lib
from pipelines.stats import phase as stats_phase
from tests import stats_outputs


def image(label: str, height: int = 300, width: int = 400):
    meta = ImageMeta(height, width, "JPEG", (1.0, 2.0, 3.0), (1.0, 4.0, 9.0), stored_sha256="")
    return SimpleNamespace(labels=(label,), stored_bytes=5000, source_bytes=50000, meta=meta)


def stats_of(per_split: dict[str, list], errors: int = 0, files_seen: int | None = None):
    """A statistics list as a run over these (fake) images would write it."""
    aggregates = {}
    for split, images in per_split.items():
        aggregate = stats_lib.SplitAggregate()
        for item in images:
            aggregate.add_image(item, 64, 64, "jpeg")
        aggregates[split] = aggregate
    seen = files_seen or sum(len(v) for v in per_split.values()) + errors
    rows = [SimpleNamespace(reason="corrupt_data", stage="decode")] * errors
    return stats_lib.build_statistics(aggregates, list(per_split),
                                      stats_lib.summarize_dead_letters(rows, seen))


def corpus(counts: dict[str, int], **size) -> dict[str, list]:
    """80/20 train/test of `counts` images per label."""
    images = [image(label, **size) for label, n in counts.items() for _ in range(n)]
    return {"train": images[0::5] + images[1::5] + images[2::5] + images[3::5],
            "test": images[4::5]}


BASE = {"cat": 100, "dog": 100, "fish": 50}


def kinds(result: dict) -> set[tuple[str, str]]:
    return {(a["kind"], a["split"]) for a in result["anomalies"]}


def test_identical_statistics_raise_nothing():
    result = drift.detect_drift(stats_of(corpus(BASE)), stats_of(corpus(BASE)))
    assert result["anomalies"] == []
    assert result["metrics"]["label_linf"]["all"] == 0.0
    assert result["metrics"]["label_js"]["all"] == pytest.approx(0.0, abs=1e-12)


def test_sampling_noise_stays_below_thresholds():
    noisy = {"cat": 103, "dog": 98, "fish": 49}
    assert drift.detect_drift(stats_of(corpus(noisy)), stats_of(corpus(BASE)))[
        "anomalies"] == []


def test_planted_class_shift_is_flagged():
    # dog's share falls 40% -> 4% while bird's rises 0% -> 33%: dog moved most.
    shifted = {"cat": 100, "dog": 10, "fish": 50, "bird": 80}
    result = drift.detect_drift(stats_of(corpus(shifted)), stats_of(corpus(BASE)))
    assert ("class_appeared", "all") in kinds(result)
    assert ("label_distribution_shift", "all") in kinds(result)
    assert ("label_distribution_shift", "train") in kinds(result)
    shift = next(a for a in result["anomalies"] if a["kind"] == "label_distribution_shift")
    assert shift["value"]["linf"] > 0.1 and "'dog'" in shift["description"]


def test_vanished_class_is_an_error():
    gone = {"cat": 100, "dog": 100}
    result = drift.detect_drift(stats_of(corpus(gone)), stats_of(corpus(BASE)))
    vanished = [a for a in result["anomalies"] if a["kind"] == "class_vanished"]
    assert [(a["severity"], "'fish'" in a["description"]) for a in vanished] == [("error", True)]


def test_error_rate_rise_is_flagged_and_a_small_one_is_not():
    base = stats_of(corpus(BASE), errors=2)
    worse = drift.detect_drift(stats_of(corpus(BASE), errors=30), base)
    assert ("error_rate_increase", "all") in kinds(worse)
    slightly = drift.detect_drift(stats_of(corpus(BASE), errors=4), base)
    assert slightly["anomalies"] == []


def test_image_size_shift_is_flagged():
    small = stats_of(corpus(BASE, height=300, width=400))
    large = stats_of(corpus(BASE, height=1200, width=1600))
    result = drift.detect_drift(large, small)
    flagged = {a["feature"] for a in result["anomalies"] if a["kind"] == "image_size_shift"}
    assert flagged == {stats_lib.ORIGINAL_HEIGHT, stats_lib.ORIGINAL_WIDTH}


def test_histogram_js_rebins_different_edges():
    a = [(0.0, 10.0, 10.0), (10.0, 20.0, 10.0)]
    b = [(0.0, 20.0, 20.0)]  # the same uniform mass, coarser buckets
    assert drift.histogram_js(a, b) == pytest.approx(0.0, abs=1e-12)
    assert drift.histogram_js(a, [(100.0, 200.0, 5.0)]) == pytest.approx(1.0)


def test_identical_rerun_with_baseline_reports_no_anomalies(tmp_path_factory):
    out = stats_outputs.rerun_output(tmp_path_factory)
    manifest = read_manifest(str(out)).to_json()
    anomalies = json.loads((out / manifest["anomalies"]).read_text())
    assert anomalies["baseline"].endswith("statistics.pb")
    assert anomalies["anomalies"] == []
    assert anomalies["metrics"]["label_linf"]["all"] == 0.0
    assert manifest["config"]["baseline_stats"] == anomalies["baseline"]


def test_unreadable_baseline_is_a_usage_error(tmp_path):
    bad = tmp_path / "stats.pb"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(UsageError):
        stats_phase.load_baseline(str(bad))
    with pytest.raises(UsageError):
        stats_phase.load_baseline(str(tmp_path / "missing.pb"))
    raw = tmp_path / "raw" / "cat"
    raw.mkdir(parents=True)
    (raw / "a.png").write_bytes(b"unused")
    code = preprocess.run(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "o"),
                           "--baseline_stats", str(bad), "--no_progress"])
    assert code == 2 and not (tmp_path / "o").exists()


def test_baseline_may_name_the_earlier_output_folder(tmp_path_factory):
    out = stats_outputs.base_output(tmp_path_factory)
    assert stats_phase.load_baseline(str(out)) == (out / "stats" / "statistics.pb").read_bytes()

"""report.html: every section, self-contained, thumbnails decoded from the written shards."""

import base64
import dataclasses
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines.contract import records
from pipelines.contract.manifest import read_manifest
from pipelines.stats import feature_stats as stats_lib
from pipelines.stats import report
from tests import corpus, stats_outputs


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return stats_outputs.base_output(tmp_path_factory)


@pytest.fixture(scope="module")
def page(output) -> str:
    manifest = read_manifest(str(output))
    assert manifest.report == report.REPORT_PATH
    return (output / manifest.report).read_text()


def section_of(page: str, key: str) -> str:
    start = page.index(f'<section id="{key}">')
    return page[start:page.index("</section>", start)]


def images_in(page: str) -> list[Image.Image]:
    sources = re.findall(r'<img src="([^"]*)"', page)
    decoded = []
    for source in sources:
        assert source.startswith("data:image/jpeg;base64,")
        data = base64.b64decode(source.split(",", 1)[1])
        decoded.append(Image.open(io.BytesIO(data)))
    return decoded


def test_every_section_is_there(page):
    for key, title in report.SECTIONS:
        assert f'<section id="{key}">' in page and title in page
    assert page.count("<svg") >= 6  # classes, 4 size histograms, formats, shards, reasons


def test_page_is_self_contained(page):
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert re.findall(r'src="([^"]*)"', page) and all(
        s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))


def test_thumbnails_are_the_shards_images(page, output):
    manifest = read_manifest(str(output))
    per_label: Counter = Counter()
    for entry in manifest.splits.values():
        per_label.update(entry.class_counts)
    thumbnails = images_in(section_of(page, "thumbnails"))
    per_class = report.thumbnails_per_class(len(manifest.labels))
    assert per_class == report.THUMBNAILS_PER_CLASS and report.thumbnails_per_class(5000) == 2
    expected = sum(min(n, per_class) for n in per_label.values())
    assert len(thumbnails) == expected
    for thumbnail in thumbnails:
        assert max(thumbnail.size) <= report.THUMBNAIL_SIDE
        thumbnail.load()


def test_read_thumbnails_shows_the_stored_pixels(output):
    manifest = read_manifest(str(output))
    shards = report.shards_in_reading_order(manifest)
    found = report.read_thumbnails(str(output), shards[:1], manifest.labels, per_class=1)
    split, path = shards[0]
    raw = next(iter(tf.data.TFRecordDataset(str(output / path))))
    example = tf.io.parse_single_example(raw, records.FEATURE_SPEC)
    stored = tf.io.decode_png(example[records.ENCODED], channels=3).numpy()
    first_label = example[records.LABEL_TEXT].values.numpy()[0].decode()
    thumbnail = found[first_label][0]
    assert thumbnail.split == split
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        thumbnail.data_uri.split(",", 1)[1]))).convert("RGB"), dtype=float)
    # Downscaled and JPEG'd for the page: the colours must still be the record's.
    assert np.abs(shown.mean(axis=(0, 1)) - stored.mean(axis=(0, 1))).max() < 12


def test_dead_letters_duplicates_and_conflicts_are_listed(page, output):
    manifest = read_manifest(str(output))
    errors = [json.loads(line) for line in (output / manifest.errors_path).open()]
    for error in errors:
        assert f"<td>{error['uri']}</td>" in page
    for name, (_, reason) in corpus.broken_files().items():
        assert name in page and reason in page
    assert "Label conflicts" in page and "photo0-in-wrong-folder.jpg" in page
    assert "photo0-copy.jpg" in page and "are listed" not in page


def test_config_timings_and_no_baseline(page):
    assert "split_salt" in page and "statistics_written_s" in page
    assert "No baseline given" in page


def test_rendering_escapes_and_shows_drift(output):
    manifest = read_manifest(str(output))
    stats = stats_lib.read_statistics(str(output / manifest.statistics))
    hostile = "<script>alert(1)</script>"
    anomalies = {"baseline": "gs://b/old/stats/statistics.pb", "thresholds": {},
                 "anomalies": [{"kind": "class_appeared", "severity": "warning", "split": "all",
                                "feature": "image/class/text", "value": 3, "threshold": None,
                                "description": f"class {hostile!r} is new"}],
                 "metrics": {"label_linf": {"all": 0.25}}}
    page = report.render_report(
        manifest=dataclasses.replace(manifest, labels=(*manifest.labels, hostile)),
        statistics=stats,
        anomalies=anomalies, thumbnails={}, errors=[], duplicates=[], timings={})
    assert hostile not in page and "&lt;script&gt;" in page
    assert "1 anomaly" in page and "class_appeared" in page and "0.2500" in page

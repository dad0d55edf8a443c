"""Near-duplicate detection: the perceptual hash, the banded candidate search, the Beam
transform, and the preprocess output's pairs, counts and report section."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import random
from itertools import combinations
from types import SimpleNamespace

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageEnhance

from pipelines import preprocess
from pipelines.contract import records
from pipelines.contract.imaging import hamming, perceptual_hash
from pipelines.contract.manifest import read_manifest
from pipelines.preprocessing import near_duplicates as nd
from pipelines.preprocessing.options import DEFAULT_SPLIT_SALT
from pipelines.preprocessing.splits import assign_split
from pipelines.stats import feature_stats as stats_lib
from pipelines.stats import report
from tests.support.demo_data import SOURCES, _load_photo

THRESHOLD = nd.DEFAULT_THRESHOLD


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def planted_variants(photo: Image.Image) -> dict[str, Image.Image]:
    """The edits a near-duplicate survives: re-encoding, resizing, a small crop, light."""
    width, height = photo.size
    dx, dy = int(width * 0.03), int(height * 0.03)
    return {
        "reencoded": Image.open(io.BytesIO(_jpeg(photo, quality=60))),
        "resized": photo.resize((int(width * 0.6), int(height * 0.6))),
        "cropped": photo.crop((dx, dy, width - dx, height - dy)),
        "brighter": ImageEnhance.Brightness(photo).enhance(1.15),
    }


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {label: Image.fromarray(_load_photo(loader)).resize((200, 150))
            for label, loader in SOURCES.items()}


def test_edited_copies_stay_within_the_threshold_and_distinct_photos_do_not(photos):
    for photo in photos.values():
        original = perceptual_hash(photo)
        for name, variant in planted_variants(photo).items():
            assert hamming(original, perceptual_hash(variant)) <= THRESHOLD, name
    hashes = [perceptual_hash(photo) for photo in photos.values()]
    assert min(hamming(a, b) for a, b in combinations(hashes, 2)) > THRESHOLD


def test_banded_search_finds_what_all_pairs_finds_on_close_hashes():
    rng = random.Random(7)
    members = []
    for index in range(150):
        base = rng.getrandbits(64)
        members.append(nd.Member(base, f"{index:03d}a", "train", ("x",)))
        flipped = base
        for bit in rng.sample(range(64), rng.randint(0, 6)):
            flipped ^= 1 << bit
        members.append(nd.Member(flipped, f"{index:03d}b", "test", ("y",)))
    expected = {(a.sha256, b.sha256) for a, b in combinations(members, 2)
                if hamming(a.perceptual_hash, b.perceptual_hash) <= THRESHOLD}
    found = nd.find_pairs(members, THRESHOLD)
    assert {(p.sha256_a, p.sha256_b) for p in found} == expected
    assert all(p.across_splits and p.across_labels for p in found)
    assert nd.summarize(found, THRESHOLD)["pairs"] == len(expected) >= 150


def test_beam_transform_equals_the_in_memory_search():
    rng = random.Random(3)
    images = [SimpleNamespace(sha256=f"{i:02d}", split="train", labels=("a",),
                              meta=SimpleNamespace(perceptual_hash=rng.getrandbits(64)))
              for i in range(40)]
    for i in range(10):  # near copies of the first ten
        images.append(SimpleNamespace(
            sha256=f"c{i}", split="test", labels=("b",),
            meta=SimpleNamespace(perceptual_hash=images[i].meta.perceptual_hash ^ 0b101)))
    images.append(SimpleNamespace(sha256="old", split="train", labels=("a",),
                                  meta=SimpleNamespace(perceptual_hash=None)))
    members = [nd._member(image) for image in images if image.meta.perceptual_hash is not None]
    expected = nd.find_pairs(members, THRESHOLD)
    assert len(expected) >= 10
    with TestPipeline() as pipeline:
        pairs = pipeline | beam.Create(images) | nd.FindNearDuplicates(THRESHOLD)
        assert_that(pairs, equal_to([tuple(expected)]))


def test_a_full_bucket_is_cut_not_compared_whole():
    same = [nd.Member(0, f"{i:04d}", "train", ()) for i in range(30)]
    assert len(nd.find_pairs(same, THRESHOLD, limit=10)) == 45


def _bucket_by_bucket(members, threshold, limit):
    """The search written plainly: a dict of buckets per band key, each sorted by (hash,
    sha256), cut to `limit`, every pair in it checked."""
    buckets = {}
    for member in members:
        for band, positions in enumerate(nd._BAND_POSITIONS):
            key = 0
            for position in positions:
                key = (key << 1) | ((member.perceptual_hash >> position) & 1)
            buckets.setdefault((band, key), []).append(member)
    found = {}
    for bucket in buckets.values():
        bucket = sorted(bucket, key=lambda m: (m.perceptual_hash, m.sha256))[:limit]
        for first, second in combinations(bucket, 2):
            distance = hamming(first.perceptual_hash, second.perceptual_hash)
            if distance <= threshold:
                pair = nd.make_pair(first, second, distance)
                found[pair.sha256_a, pair.sha256_b] = pair
    return [found[key] for key in sorted(found)]


@pytest.mark.parametrize("limit", [nd.MAX_BUCKET, 25])
def test_vectorised_search_equals_the_bucket_by_bucket_one(limit):
    """Random hashes (small buckets), a family of look-alikes (buckets of 60, cut at 25
    in one case) and exact copies of one hash: every bucket size the search handles."""
    rng = random.Random(11)
    hashes = [rng.getrandbits(64) for _ in range(400)]
    family = rng.getrandbits(64)
    hashes += [family ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for _ in range(60)]
    hashes += [hashes[0]] * 20
    members = [nd.Member(h, hashlib.sha256(str(i).encode()).hexdigest(), "train", ("a",))
               for i, h in enumerate(hashes)]
    expected = _bucket_by_bucket(members, THRESHOLD, limit)
    assert len(expected) > 60 * 59 // 2 if limit == nd.MAX_BUCKET else len(expected) > 300
    assert nd.find_pairs(members, THRESHOLD, limit) == expected
    assert nd.find_pairs(members[:1], THRESHOLD) == nd.find_pairs([], THRESHOLD) == []


def test_preprocess_lists_planted_near_duplicates_counts_them_and_shows_leakage(
        photos, tmp_path):
    raw = tmp_path / "raw"
    for label, photo in photos.items():
        (raw / label).mkdir(parents=True)
        photo.save(raw / label / "original.jpg", quality=90)
    planted = planted_variants(photos["cat"])
    for name, variant in planted.items():
        # One copy filed under another class: possible label noise as well.
        label = "coffee" if name == "brighter" else "cat"
        variant.convert("RGB").save(raw / label / f"cat_{name}.jpg", quality=85)
    out = tmp_path / "out"
    code = preprocess.run(["--input", str(raw), "--output", str(out), "--image_size", "48",
                           "--no_progress", "--splits", "train=0.5,test=0.5"])
    assert code == 0
    manifest = read_manifest(str(out))
    rows = [json.loads(line) for line in (out / nd.PATH).read_text().splitlines()]
    # The cat photo and its four copies: every pair of the five is within the threshold.
    assert len(rows) == manifest.near_duplicates["pairs"] == 10
    assert all(row["distance"] <= THRESHOLD for row in rows)
    assert manifest.near_duplicates["across_labels"] == 4
    assert manifest.near_duplicates["across_splits"] == sum(
        row["split_a"] != row["split_b"] for row in rows)
    stats = stats_lib.read_statistics(str(out / manifest.statistics))
    total = sum(stats_lib.custom_stat(stats_lib.find_feature(dataset, stats_lib.ENCODED),
                                      "near_duplicates/pairs")
                for dataset in stats_lib.split_datasets(stats).values())
    assert total == 10 + manifest.near_duplicates["across_splits"]  # a cross pair twice
    page = (out / manifest.report).read_text()
    anomalous = [row for row in rows if row["split_a"] != row["split_b"]
                 or set(row["labels_a"]) != set(row["labels_b"])]
    assert 'id="near-duplicates"' in page
    assert page.count('class="thumblabel">distance') == len(anomalous) >= 4


def _pair(a, b, split_a="train", split_b="train", labels_a=("x",), labels_b=("x",),
          distance=3, established_a=False, established_b=False):
    return nd.NearDuplicatePair(a, b, distance, split_a, split_b, labels_a, labels_b,
                                established_a, established_b)


def test_a_pair_list_crosses_pickling_whole_and_weighs_little_in_beams_state_cache():
    import objsize  # what Beam's state cache weighs side inputs with

    pairs = [_pair(f"{i:064x}", f"{i + 1:064x}", "train", ["train", "test"][i % 2],
                   ("x",), (("x",), ("y",))[i % 3 == 0], i % 13, established_a=i % 5 == 0,
                   established_b=i % 7 == 0)
             for i in range(3000)]
    as_tuple = tuple(pairs)
    arrived = pickle.loads(pickle.dumps(nd.PairList(pairs)))
    # What Beam's state cache walks when a side input arrives: the list and its blob, not
    # every pair and string.
    assert sum(1 for _ in objsize.traverse_bfs(arrived)) <= 3
    assert sum(1 for _ in objsize.traverse_bfs(as_tuple)) > 3000
    assert arrived == as_tuple and list(arrived) == pairs and len(arrived) == 3000
    assert arrived[7] == pairs[7] and arrived[-1].established_a == pairs[-1].established_a
    assert ([(p.established_a, p.established_b) for p in arrived]
            == [(p.established_a, p.established_b) for p in pairs])
    # The packed row is every field in declaration order.
    assert pairs[5]._row() == tuple(getattr(pairs[5], field.name)
                                    for field in dataclasses.fields(nd.NearDuplicatePair))
    assert pickle.loads(pickle.dumps(arrived)) == arrived  # packed again as it arrived
    assert nd.PairList() == () and not nd.PairList()
    assert pickle.loads(pickle.dumps(pairs[3])) == pairs[3]


def test_the_report_shows_leakage_first_then_label_noise_by_distance_and_no_more():
    leak_far = _pair("a1", "b1", "train", "test", distance=9)
    leak_near = _pair("a2", "b2", "train", "test", distance=1)
    noise = _pair("a3", "b3", labels_b=("y",), distance=0)
    plain = _pair("a4", "b4", distance=0)
    assert report.near_duplicates_shown([plain, noise, leak_far, leak_near]) == [
        leak_near, leak_far, noise]
    many = [_pair(f"a{i:03d}", f"b{i:03d}", "train", "test") for i in range(200)]
    assert len(report.near_duplicates_shown(many)) == report.MAX_NEAR_DUPLICATES_SHOWN


@pytest.mark.parametrize("count", [3, report.MAX_NEAR_DUPLICATES_SHOWN,
                                   report.MAX_NEAR_DUPLICATES_SHOWN + 1])
def test_the_report_says_only_the_first_pairs_are_shown_when_some_are_not(count):
    report_max = report.MAX_NEAR_DUPLICATES_SHOWN
    # Every pair is across splits and across labels: counted once, not twice.
    pairs = [_pair(f"a{i:03d}", f"b{i:03d}", "train", "test", labels_b=("y",))
             for i in range(count)]
    rows = [{**json.loads(p.to_json()), "across_splits": True, "across_labels": True,
             "thumbnail_a": "", "thumbnail_b": ""} for p in report.near_duplicates_shown(pairs)]
    manifest = SimpleNamespace(near_duplicates=nd.summarize(pairs, THRESHOLD))
    page = report._near_duplicates(manifest, rows)
    assert page.count('class="thumblabel">distance') == min(count, report_max)
    assert ("are shown" in page) == (count > report_max)


def test_moved_splits_follow_an_earlier_stored_image_then_the_smallest_hash():
    def pair(a, b, split_a, split_b, est_a=False, est_b=False):
        return nd.make_pair(nd.Member(0, a, split_a, (), est_a),
                            nd.Member(0, b, split_b, (), est_b), 0)

    # c (new, test) is close to a (earlier stored, train) and to b (new, validation).
    moves = nd.moved_splits([pair("a", "c", "train", "test", est_a=True),
                             pair("b", "c", "validation", "test")])
    # b's own anchor is b itself (c's hash is larger): it stays; a never moves.
    assert moves == {"c": "train"}
    # Two new images: both go to the smaller hash's split.
    assert nd.moved_splits([pair("x", "y", "train", "test")]) == {"y": "train"}


def test_keep_together_keeps_earlier_splits_and_moves_new_copies_to_them(photos, tmp_path):
    raw = tmp_path / "raw"
    for label, photo in photos.items():
        (raw / label).mkdir(parents=True)
        photo.save(raw / label / "original.jpg", quality=90)
    common = ["--image_size", "48", "--no_progress", "--splits", "train=0.5,test=0.5"]
    first = tmp_path / "first"
    assert preprocess.run(["--input", str(raw), "--output", str(first), *common]) == 0
    for name, variant in planted_variants(photos["cat"]).items():
        variant.convert("RGB").save(raw / "cat" / f"cat_{name}.jpg", quality=85)
    second = tmp_path / "second"
    assert preprocess.run(["--input", str(raw), "--output", str(second), *common,
                           "--reuse_from", str(first), "--near_duplicates",
                           "keep_together"]) == 0

    def splits_by_source(root):
        """{source path under raw/: split} from the written shards."""
        found = {}
        for split in read_manifest(str(root)).splits:
            for path in sorted((root / "data").glob(f"{split}-*.tfrecord")):
                with path.open("rb") as handle:
                    for record in records.read_records(handle):
                        uri = records.parse_example(record)[records.SOURCE_ID][0].decode()
                        found[uri.replace(str(raw), "")] = split
        return found

    before, after = splits_by_source(first), splits_by_source(second)
    assert all(after[uri] == split for uri, split in before.items())  # nothing moved
    cat_split = before["/cat/original.jpg"]
    # Without keep_together some copy would land in another split (hash-based splits).
    hashed = {assign_split(hashlib.sha256((raw / "cat" / f"cat_{name}.jpg").read_bytes())
                           .hexdigest(), (("train", 0.5), ("test", 0.5)), DEFAULT_SPLIT_SALT)
              for name in planted_variants(photos["cat"])}
    assert hashed - {cat_split}
    assert {after[f"/cat/cat_{name}.jpg"] for name in planted_variants(photos["cat"])} == {
        cat_split}
    assert read_manifest(str(second)).near_duplicates["across_splits"] == 0

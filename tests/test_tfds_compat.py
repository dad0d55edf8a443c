"""TensorFlow Datasets reads a preprocess output as it is (tfds.builder_from_directory).

One real output of the corpus (two labels, a multi-label image, every encoding), made
once for the module, read with the real tensorflow-datasets package.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from google.protobuf import json_format

from pipelines.contract import manifest as manifest_lib
from pipelines.contract import records, tfds_metadata
from pipelines.contract.manifest import read_manifest
from pipelines.dataset import ImageShards
from tests.support.corpus_output import preprocess_corpus


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return preprocess_corpus(tmp_path_factory)


def expected_features(labels, height, width, image_format="jpeg"):
    """The features, written with TFDS's own classes."""
    text, scalar = tfds.features.Text(), tfds.features.Tensor(shape=(), dtype=np.int64)
    image = (tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8,
                                  encoding=tfds.features.Encoding.BYTES)
             if image_format == "raw" else
             tfds.features.Image(shape=(height, width, 3), encoding_format=image_format))
    return tfds.features.FeaturesDict({
        records.ENCODED: image,
        records.FORMAT: text,
        records.HEIGHT: scalar,
        records.WIDTH: scalar,
        records.LABEL: tfds.features.Sequence(tfds.features.ClassLabel(names=labels)),
        records.LABEL_TEXT: tfds.features.Sequence(text),
        records.SOURCE_ID: tfds.features.Sequence(text),
        records.SHA256: text,
        records.ORIGINAL_HEIGHT: scalar,
        records.ORIGINAL_WIDTH: scalar,
    })


def test_metadata_is_what_tfds_write_metadata_writes(prep, tmp_path):
    manifest = read_manifest(prep)
    # TFDS's write_metadata for external TFRecords, on a copy of the shards; it only
    # finds shards directly in its folder, so there the template has no "data/".
    shards = tmp_path / "data"
    shutil.copytree(f"{prep}/data", shards)
    template = tfds_metadata.FILEPATH_TEMPLATE.removeprefix("data/")
    split_infos = [
        tfds.core.SplitInfo(
            name=name, shard_lengths=[s.num_examples for s in entry.shards],
            num_bytes=sum(s.num_bytes for s in entry.shards),
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=tfds.core.Path(shards), template=template, split=name,
                filetype_suffix="tfrecord"))
        for name, entry in manifest.splits.items() if entry.num_examples]
    tfds.folder_dataset.write_metadata(
        data_dir=shards, features=expected_features(list(manifest.labels), 32, 48),
        split_infos=split_infos, filename_template=template, check_data=False,
        description="")

    def read(folder, name):
        with open(f"{folder}/{name}") as handle:
            return handle.read()

    assert json.loads(read(prep, "features.json")) == json.loads(read(shards, "features.json"))
    ours, theirs = (json.loads(read(f, "dataset_info.json")) for f in (prep, shards))
    for split in ours["splits"]:
        assert split.pop("filepathTemplate") == tfds_metadata.FILEPATH_TEMPLATE
    for split in theirs["splits"]:
        assert split.pop("filepathTemplate") == template
    assert ours.pop("description") and theirs.pop("description", "") == ""
    assert ours == theirs
    assert read(prep, tfds_metadata.LABEL_NAMES) == read(shards, tfds_metadata.LABEL_NAMES)
    assert set(tfds_metadata.FILES) <= set(manifest_lib.OUTPUT_ENTRIES)
    assert set(tfds_metadata.FILES) <= set(manifest.entries)


@pytest.mark.parametrize("image_format", ["jpeg", "png", "raw"])
def test_features_of_every_stored_format_are_tfds_own(prep, image_format):
    manifest = read_manifest(prep)
    stored = dataclasses.replace(manifest, image=dataclasses.replace(
        manifest.image, format=image_format, height=7, width=5))
    features = expected_features(list(manifest.labels), 7, 5, image_format)
    # What FeatureConnector.save_config writes to features.json.
    assert tfds_metadata.features_json(stored) == json_format.MessageToDict(
        features.to_proto())


def test_builder_from_directory_loads_the_output(prep):
    manifest = read_manifest(prep)
    builder = tfds.builder_from_directory(prep)
    info = builder.info
    assert {name: split.num_examples for name, split in info.splits.items()} == {
        name: entry.num_examples for name, entry in manifest.splits.items() if entry.num_examples}
    assert [split.num_shards for split in info.splits.values()] == [
        len(entry.shards) for entry in manifest.splits.values() if entry.num_examples]
    label_feature = info.features[records.LABEL].feature
    assert isinstance(label_feature, tfds.features.ClassLabel)
    assert label_feature.names == list(manifest.labels)
    assert isinstance(info.features[records.ENCODED], tfds.features.Image)

    for split in ("train", "validation"):
        loaded = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        ours = list(ImageShards(prep, split))
        assert len(loaded) == manifest.splits[split].num_examples == len(ours)
        for tf_example, example in zip(loaded, ours, strict=True):
            assert tf_example[records.SHA256].decode() == example["sha256"]
            assert tuple(tf_example[records.LABEL].tolist()) == example["labels"]
            assert tuple(s.decode() for s in tf_example[records.SOURCE_ID]) == example[
                "source_ids"]
            assert tf_example[records.ENCODED].shape == (32, 48, 3)
    # The multi-label image: every label, as ClassLabel ids with our names.
    every = [e for split in ("train", "validation")
             for e in tfds.as_numpy(builder.as_dataset(split=split))]
    several = [e for e in every if len(e[records.LABEL]) > 1]
    assert len(several) == 1
    assert [label_feature.int2str(i) for i in several[0][records.LABEL]] == [
        t.decode() for t in several[0][records.LABEL_TEXT]]


def test_tfds_pixels_are_the_trainers(prep):
    """TFDS decodes images with tf.image.decode_image; the trainer and the reader with the
    accurate DCT. The difference is recorded in docs/data-contract.md."""
    builder = tfds.builder_from_directory(prep)
    loaded = np.stack([e[records.ENCODED] for e in tfds.as_numpy(
        builder.as_dataset(split="train", shuffle_files=False))])
    ours = np.stack([e["image"] for e in ImageShards(prep, "train")])
    difference = np.abs(loaded.astype(int) - ours.astype(int))
    assert difference.max() <= 8 and difference.mean() < 2.0


def test_split_slicing(prep):
    builder = tfds.builder_from_directory(prep)
    total = builder.info.splits["train"].num_examples

    def shas(split):
        return [e[records.SHA256] for e in tfds.as_numpy(
            builder.as_dataset(split=split, shuffle_files=False))]

    first, rest = shas("train[:50%]"), shas("train[50%:]")
    assert len(first) == total // 2 and len(first) + len(rest) == total
    assert first + rest == shas("train")
    # TFDS rounds a percent boundary to the closest record.
    assert shas("train[:10%]") == shas("train")[:round(total * 0.1)]

"""TFDS metadata of an output: what lets `tfds.builder_from_directory(output)` read it.

TFDS reads external TFRecords through three files beside them, as its own
`tfds.folder_dataset.write_metadata` writes them: `dataset_info.json` (splits, shard
lengths and bytes, where the shards are), `features.json` (how each record key decodes)
and one `<feature>.labels.txt` per `ClassLabel` (the label names, one a line). This
module writes the same JSON without importing TensorFlow Datasets (a test holds it
equal to what `write_metadata` writes for the same shards), from the manifest alone:
the shards are not read again.

Features are keyed by the record keys themselves (`image/encoded`, ...; TFDS allows a
`/` in a feature name and serializes it as that key), so the stored bytes need no
change. The labels are a `Sequence(ClassLabel)`: a record carries every label of its
image (`image/class/label`), one for most images, several for a label conflict; the
trainer uses the first.
"""

from __future__ import annotations

import json

from apache_beam.io.filesystems import FileSystems

from pipelines.contract import records
from pipelines.contract.manifest import Manifest, join

DATASET_INFO = "dataset_info.json"
FEATURES = "features.json"
# TFDS names a ClassLabel's names file after the feature, "/" replaced by ".".
LABEL_NAMES = records.LABEL.replace("/", ".") + ".labels.txt"
FILES = (DATASET_INFO, FEATURES, LABEL_NAMES)  # top-level entries of every output
VERSION = "1.0.0"  # write_metadata's default; the manifest's own version is separate
# Shards are data/{split}-{index:05d}-of-{count:05d}.tfrecord (preprocessing.splits).
FILEPATH_TEMPLATE = "data/{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"

_FEATURES = "tensorflow_datasets.core.features."
_TEXT = {"pythonClassName": _FEATURES + "text_feature.Text", "text": {}}
_INT64 = {"pythonClassName": _FEATURES + "tensor_feature.Tensor",
          "tensor": {"dtype": "int64", "encoding": "none", "shape": {}}}


def _sequence(feature: dict) -> dict:
    return {"pythonClassName": _FEATURES + "sequence_feature.Sequence",
            "sequence": {"feature": feature, "length": "-1"}}


def _image(height: int, width: int, image_format: str) -> dict:
    shape = {"dimensions": [str(height), str(width), "3"]}
    if image_format == "raw":  # HxWx3 uint8 bytes: TFDS decodes them with decode_raw
        return {"pythonClassName": _FEATURES + "tensor_feature.Tensor",
                "tensor": {"dtype": "uint8", "encoding": "bytes", "shape": shape}}
    return {"pythonClassName": _FEATURES + "image_feature.Image",
            "image": {"dtype": "uint8", "encodingFormat": image_format, "shape": shape}}


def features_json(manifest: Manifest) -> dict:
    """`features.json`: a FeaturesDict with one feature per record key."""
    image = manifest.image
    class_label = {"pythonClassName": _FEATURES + "class_label_feature.ClassLabel",
                   "classLabel": {"numClasses": str(len(manifest.labels))}}
    features = {
        records.ENCODED: _image(image.height, image.width, image.format),
        records.FORMAT: _TEXT,
        records.HEIGHT: _INT64,
        records.WIDTH: _INT64,
        records.LABEL: _sequence(class_label),
        records.LABEL_TEXT: _sequence(_TEXT),
        records.SOURCE_ID: _sequence(_TEXT),
        records.SHA256: _TEXT,
        records.ORIGINAL_HEIGHT: _INT64,
        records.ORIGINAL_WIDTH: _INT64,
    }
    return {"featuresDict": {"features": dict(sorted(features.items()))},
            "pythonClassName": _FEATURES + "features_dict.FeaturesDict"}


def dataset_info_json(manifest: Manifest) -> dict:
    """`dataset_info.json`: every split with records, its shard lengths and bytes (int64s
    as strings, as protobuf's JSON writes them). A split without records is left out:
    TFDS cannot read a split of no files."""
    splits = [
        {"filepathTemplate": FILEPATH_TEMPLATE,
         "name": name,
         "numBytes": str(sum(shard.num_bytes for shard in entry.shards)),
         "shardLengths": [str(shard.num_examples) for shard in entry.shards]}
        for name, entry in manifest.splits.items() if entry.num_examples
    ]
    return {
        "description": (f"Images of {manifest.input} prepared by imagebeam "
                        f"({len(manifest.labels)} labels; manifest.json has the details)."),
        "fileFormat": "tfrecord",
        "splits": splits,
        "version": VERSION,
    }


def label_names_text(labels: tuple[str, ...]) -> str | None:
    """The names file: one label a line, as ClassLabel writes it; None if TFDS would read
    the names back changed (it strips each line and drops empty ones): then the file is
    not written, and TFDS shows label ids only, rather than wrong names."""
    if any(label != label.strip() or "\n" in label or "\r" in label or not label
           for label in labels):
        return None
    return "".join(label + "\n" for label in labels)


def metadata_files(manifest: Manifest) -> dict[str, str]:
    """{file name at the output root: its text}."""
    files = {
        DATASET_INFO: json.dumps(dataset_info_json(manifest), indent=2, sort_keys=True),
        FEATURES: json.dumps(features_json(manifest), indent=4, sort_keys=True),
    }
    names = label_names_text(manifest.labels)
    if names is not None:
        files[LABEL_NAMES] = names
    return files


def write_metadata(root: str, manifest: Manifest) -> None:
    """Writes the TFDS metadata files of `manifest` at the output `root` (before the
    manifest, which marks the output complete)."""
    for name, text in metadata_files(manifest).items():
        with FileSystems.create(join(root, name)) as handle:
            handle.write(text.encode())

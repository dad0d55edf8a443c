"""Batch prediction end to end: a model exported as the trainer exports it, a corpus with
corrupt files mixed in, predictions equal to direct calls of the signature."""

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines.prediction import command
from pipelines.prediction.model import load_signature, model_labels
from tests import corpus
from trainer import serving

LABELS = ("red", "green", "blue")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    """A colour classifier exported by `trainer.serving.export`: mean RGB -> softmax.
    Built, not trained: the test is about the pipeline, and this is instant."""
    inputs = keras.Input((16, 16, 3), dtype="uint8")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    dense = keras.layers.Dense(len(LABELS), activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.eye(3, dtype="float32") * 20, np.zeros(3, "float32")])
    path = str(tmp_path_factory.mktemp("model") / "saved_model")
    serving.export(model, path, LABELS, 16, 16)
    return path


def run_predict(argv: list[str]) -> int:
    """The predict command with an error budget that the corpus's corrupt files (a
    quarter of its image files) fit in."""
    return command.run([*argv, "--max_error_rate", "0.5"])


def _picture(colour, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (20, 30, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def write_photos(root: Path) -> dict:
    """Class folders of 4 pictures a colour (one 'red' picture filed under blue: a
    mistake the model must make), plus broken files; returns what predict must report."""
    for index, (label, colour) in enumerate([(c, COLOURS[c]) for c in LABELS for _ in range(4)]):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        fmt = ["JPEG", "PNG"][index % 2]
        _picture(colour, index).save(folder / f"{index}.{fmt.lower()}", format=fmt)
    _picture(COLOURS["red"], 99).save(root / "blue" / "misfiled.jpg")
    (root / "purple").mkdir()  # a class the model does not know
    _picture((128, 0, 128), 7).save(root / "purple" / "p.png")
    broken = {
        "red/bomb.png": (corpus.png_bomb(), "too_many_pixels"),
        "green/text.jpg": (b"not an image at all", "not_an_image"),
        "green/empty.jpg": (b"", "not_an_image"),
        "blue/truncated.jpg": (corpus.encode(_picture(COLOURS["blue"], 5), "JPEG")[:300],
                               "undecodable"),
    }
    for name, (data, _) in broken.items():
        (root / name).write_bytes(data)
    os.symlink(root / "missing.jpg", root / "red" / "dangling.jpg")
    (root / "red" / "notes.txt").write_text("skipped: not an image name")
    return {"errors": {**{name: reason for name, (_, reason) in broken.items()},
                       "red/dangling.jpg": "unreadable"},
            "predicted": 12 + 2, "skipped": 1}


def read_output(root: Path) -> tuple[list[dict], list[dict], dict]:
    predictions = [json.loads(line) for path in sorted((root / "predictions").glob("*.jsonl"))
                   for line in path.read_text().splitlines()]
    errors = [json.loads(line) for line in (root / "errors" / "errors.jsonl").read_text()
              .splitlines()]
    return predictions, errors, json.loads((root / "summary.json").read_text())


@pytest.fixture(scope="module")
def predicted(saved_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    expected = write_photos(root / "photos")
    # batch_size 4: the bad files share batches with good ones
    code = run_predict(["--model", saved_model, "--input", str(root / "photos"),
                        "--output", str(root / "out"), "--batch_size", "4"])
    assert code == 0
    return root, expected, read_output(root / "out")


def test_predictions_equal_direct_calls_of_the_signature(predicted, saved_model):
    root, _, (predictions, _, summary) = predicted
    _, serve = load_signature(saved_model)
    assert model_labels(serve) == LABELS == tuple(summary["labels"])
    for row in predictions:
        data = Path(row["uri"]).read_bytes()
        direct = serve(image_bytes=tf.constant([data]))
        probabilities = direct["probabilities"].numpy()[0]
        assert row["label"] == direct["label"].numpy()[0].decode()
        assert row["class_id"] == int(direct["class_id"].numpy()[0])
        assert row["probability"] == pytest.approx(probabilities[row["class_id"]], abs=1e-6)
        assert [t["label"] for t in row["top_k"]] == [
            LABELS[i] for i in np.argsort(-probabilities, kind="stable")]
        assert [t["probability"] for t in row["top_k"]] == pytest.approx(
            sorted(probabilities, reverse=True), abs=1e-6)
        import hashlib
        assert row["sha256"] == hashlib.sha256(data).hexdigest()


def test_every_file_is_accounted_for_and_corrupt_files_are_dead_letters(predicted):
    root, expected, (predictions, errors, summary) = predicted
    photos = root / "photos"
    assert {Path(e["uri"]).relative_to(photos).as_posix(): e["reason"] for e in errors} == (
        expected["errors"])
    assert len(predictions) == expected["predicted"]
    assert summary["accounting"] == {
        "files_seen": expected["predicted"] + len(expected["errors"]) + expected["skipped"],
        "predicted": expected["predicted"], "errors": len(expected["errors"]),
        "skipped": expected["skipped"], "hidden_ignored": 0}
    # Every good file beside a corrupt one (batches of 4) was predicted.
    listed = {p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file()
              or p.is_symlink()}
    answered = {Path(r["uri"]).relative_to(photos).as_posix() for r in predictions}
    assert answered == listed - set(expected["errors"]) - {"red/notes.txt"}
    assert not (root / "out" / "_IN_PROGRESS").exists()
    assert not (root / "out" / "_tmp").exists()


def test_summary_accuracy_equals_a_recount_from_predictions(predicted):
    _, _, (predictions, _, summary) = predicted
    evaluation = summary["evaluation"]
    known = [r for r in predictions if r["true_labels"][0] in LABELS]
    correct = sum(r["label"] == r["true_labels"][0] for r in known)
    assert evaluation["evaluated"] == len(known) == 13
    assert evaluation["accuracy"] == correct / len(known) == 12 / 13  # the misfiled one
    assert evaluation["unknown_true_labels"] == {"purple": 1}
    rows = evaluation["confusion_matrix"]["rows"]
    assert rows[LABELS.index("blue")][LABELS.index("red")] == 1
    assert evaluation["per_class"]["blue"]["recall"] == 4 / 5
    assert summary["predicted_labels"] == {
        label: sum(r["label"] == label for r in predictions) for label in LABELS}


def test_rerun_needs_overwrite_and_foreign_outputs_are_refused(predicted, saved_model, tmp_path):
    root, _, (predictions, _, _) = predicted
    args = ["--model", saved_model, "--input", str(root / "photos"), "--batch_size", "64"]
    assert run_predict([*args, "--output", str(root / "out")]) == 2  # complete: ours
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    assert run_predict([*args, "--output", str(foreign)]) == 2
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    assert run_predict([*args, "--output", str(root / "photos" / "out")]) == 2  # overlap
    assert run_predict([*args, "--output", str(Path(saved_model) / "preds")]) == 2
    assert not (Path(saved_model) / "preds").exists() and not (root / "photos" / "out").exists()
    assert run_predict([*args, "--output", str(root / "out"), "--overwrite"]) == 0
    again, _, _ = read_output(root / "out")
    key = lambda row: row["uri"]  # noqa: E731
    # Batches of 64 here, of 4 in the first run: the last bit of a float may differ.
    def exact(row):
        return {**row, "probability": round(row["probability"], 5),
                "top_k": [(t["label"], round(t["probability"], 5)) for t in row["top_k"]]}
    assert sorted(map(exact, again), key=key) == sorted(map(exact, predictions), key=key)


def test_labels_csv_and_a_retraining_current_json(saved_model, tmp_path):
    expected = write_photos(tmp_path / "photos")
    rows = ["uri,label", "red/0.jpeg,red", "green/5.png,green", "green/text.jpg,green",
            "blue/misfiled.jpg,blue", "../outside.jpg,red"]
    (tmp_path / "photos" / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "current.json").write_text(json.dumps({"saved_model": saved_model}))
    assert run_predict(["--model", str(tmp_path / "root" / "current.json"), "--labels",
                        str(tmp_path / "photos" / "labels.csv"),
                        "--output", str(tmp_path / "out")]) == 0
    predictions, errors, summary = read_output(tmp_path / "out")
    assert summary["model"] == saved_model and expected
    assert summary["accounting"] == {"files_seen": 5, "predicted": 3, "errors": 1,
                                     "skipped": 1, "hidden_ignored": 0}
    assert [e["reason"] for e in errors] == ["not_an_image"]
    assert summary["evaluation"]["accuracy"] == pytest.approx(2 / 3)


def test_gs_input_and_output(saved_model, tmp_path):
    from apache_beam.io.filesystems import FileSystems

    from tests.support.gcs_emulator import GcsEmulator

    expected = write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "red" / "dangling.jpg").unlink()
    del expected["errors"]["red/dangling.jpg"]
    with GcsEmulator() as emulator:
        emulator.create_bucket("images")
        emulator.upload_folder(str(tmp_path / "photos"), "gs://images/raw")
        assert run_predict(["--model", saved_model, "--input", "gs://images/raw",
                            "--output", "gs://images/preds", "--batch_size", "4"]) == 0

        def lines(path):
            with FileSystems.open(path) as handle:
                return [json.loads(line) for line in handle.read().decode().splitlines()]

        summary = json.loads(FileSystems.open("gs://images/preds/summary.json").read())
        errors = lines("gs://images/preds/errors/errors.jsonl")
        predictions = [row for match in FileSystems.match(
            ["gs://images/preds/predictions/*.jsonl"])[0].metadata_list
            for row in lines(match.path)]
        assert not FileSystems.exists("gs://images/preds/_IN_PROGRESS")
    assert {e["uri"].removeprefix("gs://images/raw/"): e["reason"] for e in errors} == (
        expected["errors"])
    assert len(predictions) == summary["accounting"]["predicted"] == expected["predicted"]
    local = {Path(r["uri"]).relative_to(tmp_path / "photos").as_posix(): r for r in
             read_output_local(saved_model, tmp_path)}
    for row in predictions:
        twin = local[row["uri"].removeprefix("gs://images/raw/")]
        assert (row["label"], row["sha256"]) == (twin["label"], twin["sha256"])
        assert row["probability"] == pytest.approx(twin["probability"], abs=1e-6)


def read_output_local(saved_model: str, tmp_path: Path) -> list[dict]:
    assert run_predict(["--model", saved_model, "--input", str(tmp_path / "photos"),
                        "--output", str(tmp_path / "local")]) == 0
    return read_output(tmp_path / "local")[0]


def test_a_rest_body_gives_the_signature_answer(saved_model, tmp_path):
    """Vertex / TF Serving REST bodies, mapped as TF Serving maps them."""
    import base64

    from pipelines.prediction import rest

    blobs = [corpus.encode(_picture(COLOURS[label], i), fmt)
             for i, (label, fmt) in enumerate([("red", "JPEG"), ("blue", "PNG"),
                                               ("green", "JPEG")])]
    b64 = [{"b64": base64.b64encode(blob).decode()} for blob in blobs]
    _, serve = load_signature(saved_model)
    direct = serve(image_bytes=tf.constant(blobs))
    expected = [{"label": direct["label"].numpy()[i].decode(),
                 "class_id": int(direct["class_id"].numpy()[i]),
                 "probabilities": direct["probabilities"].numpy()[i].tolist()}
                for i in range(len(blobs))]
    assert [row["label"] for row in expected] == ["red", "blue", "green"]
    bodies = [{"instances": [{"image_bytes": value} for value in b64]},
              {"instances": b64},
              {"inputs": {"image_bytes": b64}},
              {"inputs": b64}]
    for body in bodies:
        answer = rest.predict(serve, json.loads(json.dumps(body)))  # as sent over the wire
        assert json.loads(json.dumps(answer)) == {"predictions": expected}, body
    for bad in ({"instances": [{"image": b64[0]}]}, {"instances": [], "inputs": b64},
                {"instances": [{"b64": "not base64!"}]}):
        with pytest.raises((rest.RequestError, ValueError)):
            rest.request_inputs(bad, ["image_bytes"])


def test_a_refused_batch_is_retried_file_by_file_without_io():
    from pipelines.prediction.model import predict_batch, refusal_reason
    from pipelines.prediction.records import DeadLetter, ImageFile

    def serve(image_bytes):  # refuses any batch holding b"bad", as the guards do
        blobs = list(image_bytes.numpy())
        if b"bad" in blobs:
            raise tf.errors.InvalidArgumentError(None, None,
                                                 "assertion failed: [too_many_pixels] x")
        probabilities = np.array([[0.1, 0.2, 0.7]] * len(blobs), np.float32)
        return {"probabilities": tf.constant(probabilities),
                "class_id": tf.constant([2] * len(blobs), tf.int64),
                "label": tf.constant([b"blue"] * len(blobs))}

    files = [ImageFile(f"f{i}", ("blue",), "", b"bad" if i == 1 else b"ok") for i in range(3)]
    outcomes = predict_batch(serve, files, LABELS)
    assert [o.uri for o in outcomes] == ["f0", "f1", "f2"]
    assert isinstance(outcomes[1], DeadLetter) and outcomes[1].reason == "too_many_pixels"
    assert outcomes[0].top_k == (("blue", pytest.approx(0.7)), ("green", pytest.approx(0.2)),
                                 ("red", pytest.approx(0.1)))
    assert refusal_reason("Invalid JPEG data or crop window") == "undecodable"


def test_summary_counts_and_refuses_a_mismatch():
    from pipelines.prediction import summary
    from pipelines.preprocessing.sources import ListingCounts, SkippedFile

    listing = ListingCounts(6, (SkippedFile("x.txt", "not_an_image_name"),), 0)
    pairs = [((("red",), "red"), 2), ((("red",), "blue"), 1), ((("cyan",), "red"), 1)]
    document = summary.build_summary(pairs, 1, listing, LABELS, True, {})
    assert document["accounting"]["predicted"] == 4
    assert document["evaluation"]["accuracy"] == 2 / 3
    assert document["evaluation"]["confusion_matrix"]["rows"] == [[2, 0, 1], [0, 0, 0],
                                                                  [0, 0, 0]]
    assert document["evaluation"]["per_class"]["green"] == {"files": 0, "recall": None}
    assert document["predicted_labels"] == {"red": 3, "green": 0, "blue": 1}
    with pytest.raises(summary.AccountingMismatch):
        summary.build_summary(pairs, 0, listing, LABELS, True, {})


def test_dead_letters_over_the_error_budget_fail_the_run_without_a_summary(predicted,
                                                                            tmp_path, capsys):
    root, expected, _ = predicted
    args = ["--model", "unused", "--input", str(root / "photos"), "--output",
            str(tmp_path / "out")]
    args[1] = json.loads((root / "out" / "summary.json").read_text())["model"]
    assert command.run([*args, "--max_error_rate", "1.5"]) == 2  # not a fraction
    # 5 of the corpus's 19 image files are dead letters: over preprocess's default 0.1.
    assert command.run(args) == 1
    message = capsys.readouterr().err
    assert "5 of 19 image files (26.3%) are dead letters, over --max_error_rate 0.1" in message
    assert not (tmp_path / "out" / "summary.json").exists()
    dead = (tmp_path / "out" / "errors" / "errors.jsonl").read_text().splitlines()
    assert len(dead) == len(expected["errors"])
    # The claim stays, naming what the run wrote: a rerun may take the folder over.
    assert (tmp_path / "out" / "_IN_PROGRESS").exists()


def test_on_the_test_split_s_files_accuracy_is_the_trainer_s(photo_prep, tmp_path):
    """The trainer's metrics.json against predict over the original files of the test
    split (its records name them): served accuracy equal, and the accuracy on the stored
    records apart by no more than the serving disagreements."""
    import shutil

    from pipelines.contract import records
    from pipelines.contract.manifest import read_manifest
    from trainer import config as config_lib
    from trainer import train

    model_dir = tmp_path / "model"
    metrics = train.run(config_lib.parse_args(
        ["--data", str(photo_prep.output), "--model_dir", str(model_dir), "--epochs", "1",
         "--batch_size", "32", "--model", "linear", "--progress", "off"], {}))
    manifest = read_manifest(str(photo_prep.output))
    shards = [str(photo_prep.output / shard.path) for shard in manifest.splits["test"].shards]
    parsed = [tf.io.parse_single_example(row, {records.SOURCE_ID: tf.io.VarLenFeature(
        tf.string)}) for row in tf.data.TFRecordDataset(shards)]
    # The record's first source, as the trainer's serving agreement reads it; copied
    # byte for byte under its class folder.
    firsts = [Path(row[records.SOURCE_ID].values[0].numpy().decode()) for row in parsed]
    for source in firsts:
        (tmp_path / "test" / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp_path / "test" / source.parent.name / source.name)
    assert command.run(["--model", str(model_dir / "saved_model"), "--input",
                        str(tmp_path / "test"), "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["evaluation"]["evaluated"] == len(firsts) == (
        manifest.splits["test"].num_examples)
    accuracy = summary["evaluation"]["accuracy"]
    # metrics.json rounds to 5 places; one file of the test split moves accuracy by 1/N.
    assert accuracy == pytest.approx(metrics["served"]["test"]["accuracy"], abs=1e-5)
    disagreement = 1 - metrics["serving_agreement"]["test"]["agreement"]
    assert abs(accuracy - metrics["test"]["accuracy"]) <= disagreement + 1e-5

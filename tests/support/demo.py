"""`make demo`: the whole job on a built-in real-photo set, no cloud account needed.

Writes crops of real photos (shipped in the scikit-image wheel) as class folders,
serves them from an embedded GCS emulator (fake-gcs-server) as gs://demo/raw,
preprocesses them on the DirectRunner, trains and evaluates on CPU, and prints
where every output is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.demo_data import make_demo_images
from tests.support.gcs_emulator import GcsEmulator

OUTPUT = Path("demo_output")


def main() -> int:
    OUTPUT.mkdir(exist_ok=True)
    prep, model = OUTPUT / "prep", OUTPUT / "model"
    with tempfile.TemporaryDirectory() as raw, GcsEmulator() as emulator:
        counts = make_demo_images(raw, per_class=80)
        print(f"[demo] {sum(counts.values())} photo crops in {len(counts)} classes: {counts}")
        emulator.create_bucket("demo")
        emulator.upload_folder(raw, "gs://demo/raw")
        print(f"[demo] served from fake-gcs-server at {emulator.url} as gs://demo/raw")
        code = _run("pipelines.preprocess", "--input", "gs://demo/raw", "--output", str(prep),
                    "--image_size", "96", "--overwrite")
    if code:
        return code
    if _trainer_available():
        code = _run("trainer.task", "--data", str(prep), "--model_dir", str(model),
                    "--model", "small_cnn", "--epochs", "4", "--batch_size", "32")
        if code:
            return code
    _print_outputs(prep, model)
    return 0


def _run(module: str, *args: str) -> int:
    print(f"[demo] python -m {module} {' '.join(args)}", flush=True)
    quiet_tf = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}  # TensorFlow's C++ start-up chatter
    return subprocess.call([sys.executable, "-m", module, *args], env=quiet_tf)


def _trainer_available() -> bool:
    return (Path(__file__).resolve().parents[2] / "trainer" / "task.py").exists()


def _print_outputs(prep: Path, model: Path) -> None:
    manifest = json.loads((prep / "manifest.json").read_text())
    print(f"[demo] shards + manifest:  {prep.resolve()}/manifest.json")
    print(f"[demo] accounting:         {manifest['accounting']}")
    for key in ("statistics", "report", "transform_output"):
        if key in manifest:
            print(f"[demo] {key + ':':19s} {(prep / manifest[key]).resolve()}")
    metrics = model / "metrics.json"
    if metrics.exists():
        print(f"[demo] model:              {(model / 'saved_model').resolve()}")
        print(f"[demo] metrics:            {json.loads(metrics.read_text())}")


if __name__ == "__main__":
    sys.exit(main())

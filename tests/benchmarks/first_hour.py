"""How long the cloud commands take to answer a new user with no credentials (issue 21).

    .venv/bin/python -m tests.benchmarks.first_hour [--repeats 3]

Each command runs in a fresh process with an empty HOME and gcloud config and no credential
variable, as typed on a laptop before `gcloud auth application-default login`. Baseline in
the same run: a process that only imports the command's module (Python, Beam, the Vertex AI
client), which every run pays whatever the command does. Prints the median wall seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ISSUE_COMMAND = ["--input", "gs://b/raw", "--output", "gs://b/runs/1", "--trainer", "vertex",
                 "--trainer_image", "IMAGE", "--project", "p", "--region", "us-central1",
                 "--runner", "DataflowRunner", "--temp_location", "gs://b/tmp"]
CASES = (
    ("import pipelines.run only (baseline)", ["-c", "import pipelines.run"]),
    ("run ... --dry_run (the issue's command)", ["-m", "pipelines.run", *ISSUE_COMMAND,
                                                 "--dry_run"]),
    ("run ... (no credentials: one line, exit 2)", ["-m", "pipelines.run", *ISSUE_COMMAND]),
    ("retrain on gs:// (no credentials)", ["-m", "pipelines.retrain", "--input", "gs://b/raw",
                                           "--root", "gs://b/retrain"]),
)


def timed(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=600)
    return time.monotonic() - started, done.returncode, done.stderr.strip().splitlines()[-1:]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="imagebeam-empty-home-")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GOOGLE_", "STORAGE_EMULATOR", "CLOUDSDK"))}
    env.update(HOME=home, CLOUDSDK_CONFIG=home)
    print(f"{'case':<45} {'median s':>9} {'exit':>5}  last line")
    for name, case in CASES:
        runs = [timed(case, env) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        last = (runs[-1][2] or [""])[0][:60]
        print(f"{name:<45} {seconds:>9.1f} {runs[-1][1]:>5}  {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

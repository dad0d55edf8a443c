"""Fixed costs of the local command: what importing it loads (issue 19, item 2)."""

import subprocess
import sys

# Loaded only by the commands that use them; each took seconds of every local run.
NOT_AT_START = ("google.cloud.aiplatform", "google.cloud.aiplatform_v1", "tensorflow")


def test_preprocess_import_leaves_vertex_ai_and_tensorflow_out():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipelines.preprocess; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert not [name for name in NOT_AT_START if name in loaded]

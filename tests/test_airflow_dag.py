"""The Airflow DAG in its own environment: it parses for Cloud Composer (a pod per tick)
and runs real ticks through `airflow dags test` (SQLite, a temporary AIRFLOW_HOME).

Needs `.venv-airflow` (`make airflow`) and runs under `make test-airflow` only
(IMAGEBEAM_AIRFLOW_TEST=1): installing Airflow takes minutes, so `make test` skips it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.demo_data import make_demo_images

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_BIN = REPO / ".venv-airflow" / "bin"
DAG_FILE = REPO / "deploy" / "airflow" / "dags" / "retrain_dag.py"
ARGS = ("--image_size 32 --num_shards 1 --no_progress --direct_running_mode in_memory "
        "--model linear --epochs 1 --batch_size 16 --progress off")

pytestmark = pytest.mark.skipif(
    not os.environ.get("IMAGEBEAM_AIRFLOW_TEST"),
    reason="the Airflow environment test runs under `make test-airflow`")


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """Environment of an empty Airflow: SQLite metadata DB, our DAG folder, no examples."""
    if not (AIRFLOW_BIN / "airflow").exists():
        pytest.fail("no .venv-airflow: run `make airflow` (make test-airflow does)")
    home = tmp_path_factory.mktemp("airflow_home")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AIRFLOW", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    })
    subprocess.run([str(AIRFLOW_BIN / "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=600)
    return env


def test_dag_parses_for_composer_with_one_pod_per_tick(airflow_env):
    env = {**airflow_env, "AIRFLOW_VAR_IMAGEBEAM_LAUNCHER": "pod",
           "AIRFLOW_VAR_IMAGEBEAM_SCHEDULE": "0 */6 * * *"}
    script = (
        "import json, runpy\n"
        f"dag = runpy.run_path({str(DAG_FILE)!r})['dag']\n"
        "task = dag.get_task('tick')\n"
        "env = task.env_vars\n"  # a dict until rendered (V1EnvVar list in older providers)
        "names = sorted(env) if isinstance(env, dict) else sorted(e.name for e in env)\n"
        "print(json.dumps({'type': type(task).__name__, 'schedule': str(dag.schedule),"
        " 'max_active_runs': dag.max_active_runs, 'cmds': task.cmds, 'env': names}))\n"
    )
    result = subprocess.run([str(AIRFLOW_BIN / "python"), "-c", script], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["type"] == "KubernetesPodOperator" and parsed["cmds"] == ["bash", "-c"]
    assert parsed["schedule"] == "0 */6 * * *" and parsed["max_active_runs"] == 1
    assert {"IMAGEBEAM_INPUT", "IMAGEBEAM_ROOT", "IMAGEBEAM_RUNNER",
            "IMAGEBEAM_TRAINER"} <= set(parsed["env"])


def dags_test(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(AIRFLOW_BIN / "airflow"), "dags", "test", "imagebeam_retrain"],
                          env=env, capture_output=True, text=True, timeout=900)


def test_ticks_through_airflow_dags_test(airflow_env, tmp_path):
    raw, root = tmp_path / "raw", tmp_path / "root"
    make_demo_images(str(raw), per_class=12, size=(40, 48), seed=3)
    env = {**airflow_env,
           "AIRFLOW_VAR_IMAGEBEAM_INPUT": str(raw),
           "AIRFLOW_VAR_IMAGEBEAM_ROOT": str(root),
           "AIRFLOW_VAR_IMAGEBEAM_ARGS": ARGS,
           "AIRFLOW_VAR_IMAGEBEAM_PYTHON": sys.executable}
    first = dags_test(env)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
    current = json.loads((root / "current.json").read_text())
    record = json.loads((root / "runs" / current["run_id"] / "retrain.json").read_text())
    assert record["status"] == "promoted" and record["decoded"] == 48

    second = dags_test(env)  # the next scheduled tick: nothing new
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
    records = [json.loads(p.read_text()) for p in sorted(root.glob("runs/*/retrain.json"))]
    assert [r["status"] for r in records] == ["promoted", "no_new_data"]
    assert "no new data" in second.stdout + second.stderr

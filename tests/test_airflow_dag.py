"""The Airflow DAG in its own environment: it parses for Cloud Composer (a pod per tick)
and runs real ticks through `airflow dags test` (SQLite, a temporary AIRFLOW_HOME).

Those tests need `.venv-airflow` (`make airflow`) and run under `make test-airflow` only
(IMAGEBEAM_AIRFLOW_TEST=1): installing Airflow takes minutes, so `make test` skips them.
The allowlist of a manual run's flags (imagebeam_manual_args.py, pure Python beside the
DAG) is tested here in the project's environment.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import run as run_lib
from pipelines.preprocessing.options import UsageError
from pipelines.retraining import gate
from pipelines.retraining import tick as retrain
from tests.support.demo_data import make_demo_images

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_BIN = REPO / ".venv-airflow" / "bin"
DAG_FILE = REPO / "deploy" / "airflow" / "dags" / "retrain_dag.py"
ARGS = ("--image_size 32 --num_shards 1 --no_progress --direct_running_mode in_memory "
        "--model linear --epochs 1 --batch_size 16 --progress off")

needs_airflow = pytest.mark.skipif(
    not os.environ.get("IMAGEBEAM_AIRFLOW_TEST"),
    reason="the Airflow environment test runs under `make test-airflow`")


def _load_manual_args():
    path = DAG_FILE.parent / "imagebeam_manual_args.py"
    spec = importlib.util.spec_from_file_location("imagebeam_manual_args", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manual_args = _load_manual_args()


@pytest.mark.parametrize("extra_args, refused", [
    ("--root /elsewhere", "'--root' is not a flag a manual run may set"),
    ("--root=/elsewhere", "'--root' is not a flag a manual run may set"),
    ("--input gs://other/raw", "'--input' is not"),
    ("--labels other.csv", "'--labels' is not"),
    ("--service_account_email sa@p.iam.gserviceaccount.com", "'--service_account_email'"),
    ("--project other --region r", "'--project' is not"),
    ("--trainer_image evil:latest", "'--trainer_image' is not"),
    ("--runner DirectRunner", "'--runner' is not"),
    ("--block_on_drift none", "'--block_on_drift' is not"),
    ("--gate_metric loss", "'--gate_metric' is not"),
    ("--cache /somewhere/else", "'--cache' is not"),
    ("--run_id zzz", "'--run_id' is not"),
    ("--epochs 3 --roo /x", "'--roo' is not"),  # argparse prefixes are no way round
    ("--gate_margin 0.5", "--gate_margin '0.5': wants a number <= the deployment's margin "
                          "0.02"),
    ("--gate_margin nan", "wants a number <="),
    ("--epochs '3 --root /elsewhere'", "--epochs '3 --root /elsewhere': wants a positive"),
    ("'--epochs 3 --root /elsewhere'", "'--epochs 3 --root /elsewhere' is not"),
    ("--model 'linear --root /x'", "wants a name"),
    ("--epochs", "--epochs needs a value"),
    ("--epochs 0", "wants a positive integer"),
    ("--deterministic=yes", "--deterministic takes no value"),
    ("3", "unexpected '3'"),
    ("--epochs 3 'unclosed", "No closing quotation"),
])
def test_a_manual_run_may_not_set_what_the_deployment_fixes(extra_args, refused):
    with pytest.raises(manual_args.RefusedArgs) as raised:
        manual_args.check_extra_args(extra_args)
    assert refused in str(raised.value)


def test_allowed_flags_reach_the_tick_as_the_tokens_checked(tmp_path):
    deployment = "--image_size 32 --epochs 10 --gate_margin 0.05"
    text = manual_args.allowed_extra_args(
        "--epochs 3 --batch_size=8 --learning_rate 5e-4 --model linear --deterministic "
        "--gate_margin -0.01 --shuffle_buffer 16MiB", deployment)
    # The tick's shell splits the string on spaces: every token is one word.
    assert text.split() == manual_args.check_extra_args(text, deployment)
    config = retrain.parse_args(["--root", str(tmp_path / "root"), "--input", str(tmp_path),
                                 *deployment.split(), *text.split()])
    assert config.root == str(tmp_path / "root")
    assert config.trainer_args[-6:] == ("--epochs=3", "--batch_size=8",
                                        "--learning_rate=5e-4", "--model=linear",
                                        "--deterministic", "--shuffle_buffer=16MiB")
    assert config.model == "linear" and config.rule.margin == -0.01
    # At most the deployment's margin: its own flag if it sets one, else the tick's default.
    assert manual_args.check_extra_args("--gate_margin 0.05", deployment) == [
        "--gate_margin=0.05"]
    with pytest.raises(manual_args.RefusedArgs, match="deployment's margin 0.02"):
        manual_args.check_extra_args("--gate_margin 0.05", "--epochs 10")
    assert manual_args.allowed_extra_args("", deployment) == ""


def test_the_allowlist_names_only_flags_the_tick_takes_none_that_it_owns():
    assert manual_args.DEFAULT_GATE_MARGIN == gate.GateRule().margin
    trainer = run_lib.trainer_flag_arity()
    for flag in manual_args.VALUED:
        assert trainer.get(flag) == 1, flag
    for flag in manual_args.SWITCHES:
        assert trainer.get(flag) == 0, flag
    assert manual_args.GATE_MARGIN in {option for action in retrain._parser()._actions
                                       for option in action.option_strings}
    owned = {"--root", "--input", "--labels", "--output", "--data", "--model_dir",
             "--warm_start", "--reuse_from", "--baseline_stats", "--overwrite", "--run_id",
             "--trainer", "--trainer_image", "--project", "--region", "--runner",
             "--service_account_email", "--gate_metric", "--block_on_drift", "--cache"}
    assert not owned & set(manual_args.ALLOWED)
    with pytest.raises(UsageError):  # the tick's own check still stands behind the list
        retrain.parse_args(["--root", "r", "--input", "i", "--model_dir", "m"])


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


@needs_airflow
def test_dag_parses_for_composer_with_one_pod_per_tick(airflow_env):
    env = {**airflow_env, "AIRFLOW_VAR_IMAGEBEAM_LAUNCHER": "pod",
           "AIRFLOW_VAR_IMAGEBEAM_SCHEDULE": "0 */6 * * *"}
    script = (
        "import json, runpy, sys\n"
        f"sys.path.insert(0, {str(DAG_FILE.parent)!r})\n"  # as Airflow does for its DAGs folder
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


def dags_test(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(AIRFLOW_BIN / "airflow"), "dags", "test", "imagebeam_retrain",
                           *flags], env=env, capture_output=True, text=True, timeout=900)


@needs_airflow
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


@needs_airflow
def test_a_manual_run_overriding_the_root_fails_before_the_tick(airflow_env, tmp_path):
    raw, root, elsewhere = tmp_path / "raw", tmp_path / "root", tmp_path / "elsewhere"
    make_demo_images(str(raw), per_class=2, size=(32, 32), seed=3)
    env = {**airflow_env,
           "AIRFLOW_VAR_IMAGEBEAM_INPUT": str(raw),
           "AIRFLOW_VAR_IMAGEBEAM_ROOT": str(root),
           "AIRFLOW_VAR_IMAGEBEAM_ARGS": ARGS,
           "AIRFLOW_VAR_IMAGEBEAM_PYTHON": sys.executable}
    refused = dags_test(env, "--conf", json.dumps({"extra_args": f"--root {elsewhere}"}))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "new_state=failed" in output, output[-5000:]
    assert "'--root' is not a flag a manual run may set" in output, output[-5000:]
    assert "[retrain]" not in output and "up_for_retry" not in output.lower()
    assert not root.exists() and not elsewhere.exists()

"""Scheduled retraining: one `python -m pipelines.retrain` tick per schedule interval.

The same DAG runs locally (`make airflow`, DirectRunner, local trainer) and on Cloud
Composer (Dataflow, Vertex AI); only Airflow Variables differ. Airflow cannot share the
project's environment (its Google provider and tfx-bsl want incompatible
google-api-python-client versions), so the tick runs in the project's own interpreter:
a BashOperator calling `<repo>/.venv/bin/python` locally, a KubernetesPodOperator
running the project's container image on Composer. The tick does the work (Beam job,
training, gate, promotion); this DAG only decides when, retries, and keeps the logs.

Variables (Airflow Variables; an AIRFLOW_VAR_<NAME> environment variable wins):

    imagebeam_schedule   cron or preset, "none" = manual only (default "0 3 * * *");
                         read when the file is parsed, like the launcher
    imagebeam_launcher   local (default) | pod
    imagebeam_input      --input: folder or gs:// prefix of class folders (leave empty
                         and put --labels CSV in imagebeam_args for a CSV)
    imagebeam_root       --root: folder or gs:// prefix holding current.json and runs/
    imagebeam_runner     DirectRunner (default) | DataflowRunner
    imagebeam_trainer    local (default) | vertex
    imagebeam_deploy_endpoint  --deploy_endpoint: a Vertex AI endpoint (display name or
                         ID) that each promoted model is deployed to; empty (default):
                         no deployment. --deploy_traffic and the machine flags go in
                         imagebeam_args
    imagebeam_args       any other tick flags (preprocess, Beam, trainer, gate), e.g. on
                         Composer "--project P --region R --temp_location gs://B/tmp
                         --sdk_container_image IMAGE --trainer_image IMAGE --epochs 10"
    imagebeam_python     local: the project's interpreter (default <repo>/.venv/bin/python)
    imagebeam_project_dir  local: working directory (default: the repo holding this file)
    imagebeam_image      pod: the project's container image
    imagebeam_namespace  pod: default composer-user-workloads (Composer 3)
    imagebeam_kube_config  pod: default /home/airflow/composer_kube_config (Composer 3)
    imagebeam_timeout_hours  a tick longer than this is stopped (default 12)

A manual run may add flags with the `extra_args` param (e.g. "--epochs 20
--learning_rate 0.0005"): training flags only, and a --gate_margin at most the
deployment's; anything else (--root, --input, --labels, --project, --service_account_email,
a looser gate, ...) fails the task before the tick starts. The allowlist:
`imagebeam_manual_args.py`, beside this file.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from imagebeam_manual_args import RefusedArgs, allowed_extra_args  # the DAGs folder is on sys.path

try:  # Airflow 3
    from airflow.sdk import DAG, Param, Variable
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # Airflow 2.10 (Composer images still ship it)
    from airflow import DAG
    from airflow.exceptions import AirflowFailException
    from airflow.models import Variable
    from airflow.models.param import Param

REPO = Path(__file__).resolve().parents[3]  # deploy/airflow/dags/<this file>


def _setting(name: str, default: str) -> str:
    """A Variable needed while parsing; positional default: Airflow 2 and 3 name it apart."""
    return str(Variable.get(name, default))


def _var(name: str, default: str = "") -> str:
    """A Variable read when the task runs (a template), not at every parse."""
    return "{{ var.value.get('%s', '%s') }}" % (name, default)  # noqa: UP031 - Jinja braces


SCHEDULE = _setting("imagebeam_schedule", "0 3 * * *")
LAUNCHER = _setting("imagebeam_launcher", "local")
TIMEOUT = datetime.timedelta(hours=float(_setting("imagebeam_timeout_hours", "12")))

# noglob: imagebeam_args is split into words by the shell, never expanded as a pattern.
TICK = """set -euo pipefail -o noglob
args=(--root "$IMAGEBEAM_ROOT" --runner "$IMAGEBEAM_RUNNER" --trainer "$IMAGEBEAM_TRAINER")
if [ -n "$IMAGEBEAM_INPUT" ]; then args+=(--input "$IMAGEBEAM_INPUT"); fi
if [ -n "$IMAGEBEAM_DEPLOY_ENDPOINT" ]; then
  args+=(--deploy_endpoint "$IMAGEBEAM_DEPLOY_ENDPOINT")
fi
exec "$IMAGEBEAM_PYTHON" -m pipelines.retrain "${args[@]}" $IMAGEBEAM_ARGS $IMAGEBEAM_EXTRA_ARGS
"""


def tick_env(python: str) -> dict[str, str]:
    """The tick's settings as templated environment variables (no shell quoting of values)."""
    return {
        "IMAGEBEAM_INPUT": _var("imagebeam_input"),
        "IMAGEBEAM_ROOT": _var("imagebeam_root"),
        "IMAGEBEAM_RUNNER": _var("imagebeam_runner", "DirectRunner"),
        "IMAGEBEAM_TRAINER": _var("imagebeam_trainer", "local"),
        "IMAGEBEAM_DEPLOY_ENDPOINT": _var("imagebeam_deploy_endpoint"),
        "IMAGEBEAM_ARGS": _var("imagebeam_args"),
        # Refused flags fail the rendering, before the tick starts (and without retries).
        "IMAGEBEAM_EXTRA_ARGS": "{{ params.extra_args | imagebeam_allowed_args("
                                "var.value.get('imagebeam_args', '')) }}",
        "IMAGEBEAM_PYTHON": _var("imagebeam_python", python),
        "PYTHONUNBUFFERED": "1",  # tick lines reach the task log as they happen
    }


def checked_extra_args(extra_args: str, deployment_args: str) -> str:
    """The `imagebeam_allowed_args` template filter: the manual run's flags, each one word;
    a refused flag fails the task for good (a retry would be refused again)."""
    try:
        return allowed_extra_args(extra_args, deployment_args)
    except RefusedArgs as err:
        raise AirflowFailException(str(err)) from err


def local_tick():
    """The tick in the project's venv on this machine."""
    try:
        from airflow.providers.standard.operators.bash import BashOperator
    except ImportError:  # Airflow 2.10
        from airflow.operators.bash import BashOperator

    return BashOperator(
        task_id="tick",
        bash_command=TICK,
        env=tick_env(str(REPO / ".venv" / "bin" / "python")),
        append_env=True,  # PATH, HOME, credentials
        cwd=_var("imagebeam_project_dir", str(REPO)),
    )


def pod_tick():
    """The tick in the project's container image (Cloud Composer: its own environment
    cannot hold TensorFlow and Beam next to Airflow's Google provider)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    return KubernetesPodOperator(
        task_id="tick",
        name="imagebeam-retrain",
        image=_var("imagebeam_image"),
        cmds=["bash", "-c"],
        arguments=[TICK],
        env_vars=tick_env("python"),
        namespace=_var("imagebeam_namespace", "composer-user-workloads"),
        config_file=_var("imagebeam_kube_config", "/home/airflow/composer_kube_config"),
        kubernetes_conn_id="kubernetes_default",
        get_logs=True,
        on_finish_action="delete_pod",
        startup_timeout_seconds=900,  # a cold node pulls a multi-GB image
        # Dataflow and Vertex AI do the heavy work; the pod lists the input and runs the
        # gate (TensorFlow, two SavedModels over the test split).
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"}),
    )


with DAG(
    dag_id="imagebeam_retrain",
    description="Incremental preprocess, candidate training, gate, promotion",
    schedule=None if SCHEDULE.lower() == "none" else SCHEDULE,
    start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    catchup=False,  # one tick covers all new data; missed intervals need no replay
    max_active_runs=1,  # ticks must not race on current.json
    default_args={
        "retries": 1,  # a retry is a new tick: it reuses what the failed one preprocessed
        "retry_delay": datetime.timedelta(minutes=10),
        "execution_timeout": TIMEOUT,
    },
    params={"extra_args": Param("", type="string",
                                description="training flags added to this run's tick "
                                "(allowlist: imagebeam_manual_args.py)")},
    user_defined_filters={"imagebeam_allowed_args": checked_extra_args},
    tags=["imagebeam", "retraining"],
    doc_md=__doc__,
) as dag:
    if LAUNCHER == "pod":
        pod_tick()
    elif LAUNCHER == "local":
        local_tick()
    else:
        raise ValueError(f"imagebeam_launcher must be local or pod, got {LAUNCHER!r}")

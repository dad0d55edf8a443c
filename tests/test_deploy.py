"""Deployment to a Vertex AI endpoint: the requests `deploy --dry_run` builds validate
(aiplatform_v1 types, strict JSON round trip), the canary's traffic split, and retrain's
--deploy_endpoint from its flags to the Airflow DAG. The calls to Vertex AI themselves
cannot run here (no cloud); `pipelines.cloud.deploy.deploy` is the thin edge that sends
these same requests."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
from google.cloud import aiplatform_v1 as aip

from pipelines import deploy as command
from pipelines.cloud import deploy
from pipelines.cloud.vertex import SpecError

REPO = Path(__file__).resolve().parents[1]
BUCKET = "imagebeam-deploy"
PARENT = "projects/p/locations/europe-west4"


def _config(**changes) -> deploy.DeployConfig:
    values = dict(project="p", region="europe-west4", artifact_uri="gs://b/model/saved_model",
                  endpoint="imagebeam", model_id="imagebeam-20261201-120000")
    values.update(changes)
    return deploy.DeployConfig(**values)


def _strict(request):
    """The request parsed back from its JSON body by its own type (unknown fields and
    enum names refused), as Vertex's API front end would read it."""
    return deploy.parse_request(type(request), deploy.request_json(request))


def test_a_new_endpoint_gets_the_model_with_all_its_traffic():
    plan = deploy.build_plan(_config(), None)
    upload, create, request = plan.upload, plan.create_endpoint, plan.deploy
    assert upload.parent == PARENT and upload.model_id == "imagebeam-20261201-120000"
    assert upload.model.artifact_uri == "gs://b/model/saved_model"
    # Google's prebuilt TensorFlow server, from the registry area of the region.
    assert upload.model.container_spec.image_uri == (
        "europe-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest")
    assert create.parent == PARENT and create.endpoint.display_name == "imagebeam"
    assert request.deployed_model.model == f"{PARENT}/models/imagebeam-20261201-120000"
    assert request.endpoint == deploy.CREATED_ENDPOINT
    assert dict(request.traffic_split) == {"0": 100}
    resources = request.deployed_model.dedicated_resources
    assert resources.machine_spec.machine_type == "n1-standard-4"
    assert (resources.min_replica_count, resources.max_replica_count) == (1, 1)
    for sent in (upload, create, request):
        assert _strict(sent) == sent
    assert list(plan.to_json()) == ["UploadModelRequest", "CreateEndpointRequest",
                                    "DeployModelRequest"]
    assert plan.to_json()["UploadModelRequest"]["model"]["containerSpec"]["imageUri"] == (
        upload.model.container_spec.image_uri)


def test_a_canary_takes_its_percent_and_the_deployed_models_share_the_rest():
    endpoint = aip.Endpoint(name=f"{PARENT}/endpoints/42", traffic_split={"111": 75, "222": 25,
                                                                         "333": 0})
    plan = deploy.build_plan(_config(endpoint="42", traffic=10), endpoint)
    assert plan.create_endpoint is None and plan.deploy.endpoint == endpoint.name
    split = dict(plan.deploy.traffic_split)
    assert split == {"0": 10, "111": 68, "222": 22, "333": 0}  # 67.5 / 22.5, remainders
    assert sum(split.values()) == 100 and _strict(plan.deploy) == plan.deploy
    assert deploy.traffic_split(100, {"111": 100}) == {"0": 100, "111": 0}
    assert deploy.traffic_split(30, {}) == {"0": 100}  # nothing else serves
    assert deploy.traffic_split(0, {"a": 1, "b": 1, "c": 1}) == {"0": 0, "a": 34, "b": 33,
                                                                 "c": 33}


def test_gpu_serving_image_machine_and_regions():
    plan = deploy.build_plan(_config(accelerator_type="NVIDIA_TESLA_T4", region="us-central1",
                                     max_replicas=3), None)
    assert plan.upload.model.container_spec.image_uri == (
        "us-docker.pkg.dev/vertex-ai/prediction/tf2-gpu.2-15:latest")
    machine = plan.deploy.deployed_model.dedicated_resources.machine_spec
    assert machine.accelerator_type == aip.AcceleratorType.NVIDIA_TESLA_T4
    assert machine.accelerator_count == 1
    assert _strict(plan.deploy) == plan.deploy
    assert deploy.prebuilt_image("asia-northeast1").startswith("asia-docker.pkg.dev/")
    assert deploy.prebuilt_image("australia-southeast1").startswith("asia-docker.pkg.dev/")
    assert deploy.prebuilt_image("me-west1").startswith("europe-docker.pkg.dev/")
    assert deploy.model_id_for("20261201-102500-Run.7") == "imagebeam-20261201-102500-run-7"
    assert deploy.saved_by_newer_tensorflow("2.21.0")
    assert not deploy.saved_by_newer_tensorflow("2.15.1")
    assert not deploy.saved_by_newer_tensorflow(None)


@pytest.mark.parametrize("changes, message", [
    (dict(artifact_uri="/local/saved_model"), "gs:// only"),
    (dict(traffic=101), "a percentage"),
    (dict(min_replicas=2, max_replicas=1), "min <= max"),
    (dict(machine_type="g2-standard-8", accelerator_type="NVIDIA_TESLA_T4"), "carries NVIDIA_L4"),
    (dict(accelerator_type="NVIDIA_TPU"), "unknown accelerator"),
    (dict(model_id="9lives"), "model ID"),
    (dict(serving_image="not an image"), "container image"),
    (dict(endpoint="projects/p/locations/us-central1/endpoints/1"), "not --region"),
    (dict(endpoint="a/b"), "display name"),
])
def test_what_vertex_would_refuse_is_refused_before_sending(changes, message):
    with pytest.raises(SpecError, match=message):
        deploy.dry_run_plan(_config(**changes))


@pytest.fixture(scope="module")
def model_in_bucket(tmp_path_factory):
    """A small SavedModel in fake-gcs-server, and a retraining root's current.json
    pointing at it."""
    import tensorflow as tf

    from tests.support.gcs_emulator import GcsEmulator

    local = tmp_path_factory.mktemp("deploy")
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 2},
                           input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(local / "model" / "saved_model"),
                        signatures={"serving_default": module.f})
    (local / "root").mkdir()
    (local / "root" / "current.json").write_text(json.dumps(
        {"run_id": "r1", "saved_model": f"gs://{BUCKET}/model/saved_model"}))
    with GcsEmulator() as emulator:
        emulator.create_bucket(BUCKET)
        emulator.upload_folder(str(local / "model"), f"gs://{BUCKET}/model")
        emulator.upload_folder(str(local / "root"), f"gs://{BUCKET}/root")
        yield f"gs://{BUCKET}"


def test_dry_run_prints_requests_that_parse_back_strictly(model_in_bucket, capsys):
    args = ["--model", f"{model_in_bucket}/root/current.json", "--endpoint", "imagebeam",
            "--project", "p", "--region", "europe-west4", "--model_id", "imagebeam-r1",
            "--machine_type", "n1-standard-2", "--dry_run"]
    assert command.run(args) == 0
    printed = capsys.readouterr()
    bodies = json.loads(printed.out)
    kinds = {"UploadModelRequest": aip.UploadModelRequest,
             "CreateEndpointRequest": aip.CreateEndpointRequest,
             "DeployModelRequest": aip.DeployModelRequest}
    assert list(bodies) == list(kinds)
    parsed = {name: deploy.parse_request(kinds[name], json.dumps(body))
              for name, body in bodies.items()}
    # current.json was followed to its SavedModel
    assert parsed["UploadModelRequest"].model.artifact_uri == (
        f"{model_in_bucket}/model/saved_model")
    assert parsed["DeployModelRequest"].deployed_model.model == (
        f"{PARENT}/models/imagebeam-r1")
    assert parsed["DeployModelRequest"].deployed_model.dedicated_resources.machine_spec \
        .machine_type == "n1-standard-2"
    # This TensorFlow is newer than the prebuilt server's: the user is told.
    assert "may not load every op" in printed.err
    assert "only if no endpoint in europe-west4 is named 'imagebeam'" in printed.err

    # An endpoint given by ID exists: no create request; its split is read when deploying.
    assert command.run([*args[:3], "1234", *args[4:], "--traffic", "10"]) == 0
    printed = capsys.readouterr()
    bodies = json.loads(printed.out)
    assert "CreateEndpointRequest" not in bodies
    assert bodies["DeployModelRequest"]["endpoint"] == f"{PARENT}/endpoints/1234"
    assert bodies["DeployModelRequest"]["trafficSplit"] == {"0": 10}
    assert "share the other 90%" in printed.err


def test_usage_errors_send_nothing(model_in_bucket, tmp_path, capsys):
    base = ["--endpoint", "e", "--project", "p", "--region", "us-central1", "--dry_run"]
    assert command.run(["--model", str(tmp_path), *base]) == 2
    assert "gs:// only" in capsys.readouterr().err
    assert command.run(["--model", f"{model_in_bucket}/nothing", *base]) == 2
    assert "no SavedModel" in capsys.readouterr().err
    assert command.run(["--model", f"{model_in_bucket}/model/saved_model", *base,
                        "--traffic", "-5"]) == 2
    assert "a percentage" in capsys.readouterr().err


def test_without_credentials_it_stops_before_reading_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    assert command.run(["--model", "gs://b/model/saved_model", "--endpoint", "e", "--project",
                        "p", "--region", "us-central1"]) == 2
    assert "credentials are needed (gs:// paths and Vertex AI)" in capsys.readouterr().err


# ---------------------------------------------------------------- retrain --deploy_endpoint

RETRAIN = ["--input", "gs://b/raw", "--root", "gs://b/root", "--project", "p", "--region",
           "europe-west4"]


def test_retrain_deploy_flags_are_checked_before_the_tick():
    from pipelines.contract.errors import UsageError
    from pipelines.retraining import tick as retrain

    config = retrain.parse_args([*RETRAIN, "--deploy_endpoint", "imagebeam",
                                 "--deploy_traffic", "10", "--deploy_machine_type",
                                 "n1-standard-2", "--epochs", "1"])
    assert (config.deploy.endpoint, config.deploy.traffic) == ("imagebeam", 10)
    assert (config.deploy.project, config.deploy.region) == ("p", "europe-west4")
    assert config.deploy.machine_type == "n1-standard-2"
    assert config.trainer_args == ("--epochs", "1")  # the deploy flags are the tick's own
    assert retrain.parse_args(RETRAIN).deploy is None
    for extra, message in [
            (["--root", "/local/root"], "gs:// --root"),
            (["--deploy_traffic", "150"], "a percentage"),
            (["--deploy_accelerator_type", "NVIDIA_TESLA_T4", "--deploy_machine_type",
              "g2-standard-8"], "carries NVIDIA_L4")]:
        with pytest.raises(UsageError, match=message):
            retrain.parse_args([*RETRAIN, "--deploy_endpoint", "e", *extra])


def test_a_failed_deployment_is_recorded_not_raised(tmp_path, monkeypatch):
    """After the swap nothing may undo the promotion: the error goes into retrain.json."""
    from pipelines.retraining import tick as retrain

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    config = retrain.parse_args([*RETRAIN, "--deploy_endpoint", "imagebeam"]).deploy
    record = retrain.deploy_step(config, "20261201-120000-000001", "gs://b/root/m/saved_model")
    assert record["endpoint"] == "imagebeam"
    assert record["model_id"] == "imagebeam-20261201-120000-000001"
    assert "DefaultCredentialsError" in record["error"]


def _dag_source() -> ast.Module:
    return ast.parse((REPO / "deploy/airflow/dags/retrain_dag.py").read_text())


def test_the_airflow_dag_passes_deploy_endpoint_through(tmp_path):
    """The DAG's tick script (bash, as both launchers run it) with a stand-in interpreter
    that prints the words it was given; Airflow itself is not needed for that."""
    tree = _dag_source()
    tick = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and getattr(node.targets[0], "id", None) == "TICK")
    tick_env = next(node for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name == "tick_env")
    returned = next(node.value for node in ast.walk(tick_env) if isinstance(node, ast.Return))
    variables = {key.value: ast.unparse(value)
                 for key, value in zip(returned.keys, returned.values, strict=True)}
    assert "imagebeam_deploy_endpoint" in variables["IMAGEBEAM_DEPLOY_ENDPOINT"]
    echo = tmp_path / "python"
    echo.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"\n")
    echo.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "IMAGEBEAM_PYTHON": str(echo),
           "IMAGEBEAM_ROOT": "gs://b/root", "IMAGEBEAM_RUNNER": "DirectRunner",
           "IMAGEBEAM_TRAINER": "local", "IMAGEBEAM_INPUT": "gs://b/raw",
           "IMAGEBEAM_ARGS": "--deploy_traffic 10", "IMAGEBEAM_EXTRA_ARGS": ""}

    def words(**extra) -> list[str]:
        result = subprocess.run(["bash", "-c", tick], env={**env, **extra},
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.splitlines()

    given = words(IMAGEBEAM_DEPLOY_ENDPOINT="my endpoint")
    assert given[given.index("--deploy_endpoint") + 1] == "my endpoint"  # one word
    assert given[-2:] == ["--deploy_traffic", "10"]
    assert "--deploy_endpoint" not in words(IMAGEBEAM_DEPLOY_ENDPOINT="")
    # A manual run may not redirect deployments.
    import importlib.util
    path = REPO / "deploy/airflow/dags/imagebeam_manual_args.py"
    spec = importlib.util.spec_from_file_location("imagebeam_manual_args", path)
    manual = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manual)
    for flag in ("--deploy_endpoint", "--deploy_traffic"):
        with pytest.raises(manual.RefusedArgs, match="is not a flag a manual run may set"):
            manual.check_extra_args(f"{flag} x")

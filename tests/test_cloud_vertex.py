"""The Vertex AI CustomJob: built and checked with the aiplatform_v1 types, from
`pipelines.run --trainer vertex --dry_run` to a (fake) submission."""

from __future__ import annotations

import json

import pytest
from google.cloud import aiplatform_v1 as aip
from google.protobuf.json_format import ParseError

from pipelines import run
from pipelines.cloud import vertex
from tests.support.gcs_emulator import GcsEmulator

BUCKET = "imagebeam-vertex"
IMAGE = "us-central1-docker.pkg.dev/my-project/imagebeam/imagebeam-trainer:1"
SERVICE_ACCOUNT = "trainer@my-project.iam.gserviceaccount.com"


def _config(**changes) -> vertex.VertexConfig:
    values = dict(project="my-project", region="us-central1", image_uri=IMAGE,
                  base_output_dir="gs://b/run/model")
    values.update(changes)
    return vertex.VertexConfig(**values)


def test_default_job_is_one_l4_gpu_running_the_trainer():
    job = vertex.build_custom_job(_config(), ["--data", "gs://b/run/prep", "--epochs", "3"])
    pool = job.job_spec.worker_pool_specs[0]
    assert pool.machine_spec.machine_type == "g2-standard-8"
    assert pool.machine_spec.accelerator_type == aip.AcceleratorType.NVIDIA_L4
    assert pool.machine_spec.accelerator_count == 1 and pool.replica_count == 1
    assert list(pool.container_spec.command) == ["python", "-m", "trainer.task"]
    assert list(pool.container_spec.args) == ["--data", "gs://b/run/prep", "--epochs", "3"]
    # Vertex derives AIP_MODEL_DIR / AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR from it.
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://b/run/model"
    # The JSON is the request body, and parses back strictly into the same job.
    assert vertex.parse_job_json(vertex.job_json(job)) == job


def test_several_replicas_are_a_chief_pool_and_a_worker_pool_that_vertex_gives_tf_config():
    job = vertex.build_custom_job(
        _config(replica_count=3, machine_type="a2-highgpu-2g", accelerator_type="NVIDIA_TESLA_A100",
                accelerator_count=2), ["--data", "gs://b/run/prep"])
    chief, workers = job.job_spec.worker_pool_specs
    assert (chief.replica_count, workers.replica_count) == (1, 2)
    assert chief.machine_spec == workers.machine_spec
    assert workers.machine_spec.accelerator_count == 2
    assert chief.container_spec == workers.container_spec
    assert vertex.parse_job_json(vertex.job_json(job)) == job
    assert vertex.describe(job).startswith("3 x a2-highgpu-2g + 2 x NVIDIA_TESLA_A100")
    # What Vertex sets on the second machine of pool 1: a worker after the chief.
    from trainer.distribute import cluster_position
    tf_config = ('{"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"]}, '
                 '"task": {"type": "worker", "index": 1}}')
    assert cluster_position({"TF_CONFIG": tf_config}) == (2, 3)


@pytest.mark.parametrize("changes, message", [
    ({"replica_count": 0}, "--vertex_replica_count must be at least 1"),
    ({"accelerator_type": "NVIDIA_TESLA_K9000"}, "unknown accelerator 'NVIDIA_TESLA_K9000'"),
    ({"machine_type": "g2-standard-8", "accelerator_type": "NVIDIA_TESLA_T4"},
     "g2-standard-8 carries NVIDIA_L4, not NVIDIA_TESLA_T4"),
    ({"machine_type": "n1-standard-8", "accelerator_type": "NVIDIA_L4"},
     "n1-standard-8 carries"),
    ({"accelerator_count": 0}, "must be at least 1"),
    ({"base_output_dir": "/local/model"}, "gs:// only"),
    ({"image_uri": "not an image"}, "not a container image URI"),
])
def test_jobs_vertex_would_refuse_fail_here(changes, message):
    with pytest.raises(vertex.SpecError, match=message):
        vertex.build_custom_job(_config(**changes), [])


def test_other_machines_and_cpu_only():
    job = vertex.build_custom_job(_config(machine_type="n1-standard-8",
                                          accelerator_type="nvidia_tesla_t4"), [])
    assert job.job_spec.worker_pool_specs[0].machine_spec.accelerator_type.name == (
        "NVIDIA_TESLA_T4")
    job = vertex.build_custom_job(_config(machine_type="n2-standard-16",
                                          accelerator_type="none"), [])
    assert job.job_spec.worker_pool_specs[0].machine_spec.accelerator_count == 0


def test_the_types_refuse_unknown_fields_and_enum_values():
    text = vertex.job_json(vertex.build_custom_job(_config(), []))
    with pytest.raises(ParseError, match="acceleratorType"):
        vertex.parse_job_json(text.replace('"NVIDIA_L4"', '"NVIDIA_L5"'))
    with pytest.raises(ParseError, match="machineTyp"):
        vertex.parse_job_json(text.replace('"machineType"', '"machineTyp"'))
    with pytest.raises(ValueError, match="Unknown field"):
        aip.ContainerSpec(image_uri=IMAGE, entrypoint=["python"])


@pytest.fixture(scope="module")
def emulator():
    with GcsEmulator() as running:
        running.create_bucket(BUCKET)
        yield running


def _run_argv(*extra: str) -> list[str]:
    return ["--input", f"gs://{BUCKET}/raw", "--output", f"gs://{BUCKET}/run",
            "--trainer", "vertex", "--dry_run", "--trainer_image", IMAGE,
            "--project", "my-project", "--region", "us-central1",
            "--runner", "DataflowRunner", "--temp_location", f"gs://{BUCKET}/tmp",
            "--service_account_email", SERVICE_ACCOUNT, "--no_use_public_ips",
            "--subnetwork", "regions/us-central1/subnetworks/private",
            "--image_size", "160", "--epochs", "5", "--model", "mobilenet_v3_small",
            "--mixed_precision", "on", *extra]


def test_dry_run_prints_the_job_it_would_submit(emulator, capsys):
    assert run.main(_run_argv("--vertex_machine_type", "a2-highgpu-1g",
                              "--vertex_accelerator_type", "NVIDIA_TESLA_A100",
                              "--vertex_timeout_hours", "6")) == 0
    out, err = capsys.readouterr()
    job = aip.CustomJob.from_json(out, ignore_unknown_fields=False)  # stdout is the JSON
    spec = job.job_spec
    pool = spec.worker_pool_specs[0]
    assert pool.machine_spec.machine_type == "a2-highgpu-1g"
    assert pool.machine_spec.accelerator_type == aip.AcceleratorType.NVIDIA_TESLA_A100
    assert pool.container_spec.image_uri == IMAGE
    # The trainer's flags, and only they, reach the trainer; the rest went to preprocess.
    assert list(pool.container_spec.args) == [
        "--data", f"gs://{BUCKET}/run/prep", "--model_dir", f"gs://{BUCKET}/run/model",
        "--epochs", "5", "--model", "mobilenet_v3_small", "--mixed_precision", "on"]
    assert spec.base_output_directory.output_uri_prefix == f"gs://{BUCKET}/run/model"
    assert spec.service_account == SERVICE_ACCOUNT  # the identity passes through
    assert spec.scheduling.timeout.total_seconds() == 6 * 3600
    # Preprocess gets its flags, the Dataflow network and identity options included.
    assert "--image_size 160" in err and "--no_use_public_ips" in err
    assert f"--service_account_email {SERVICE_ACCOUNT}" in err
    assert "--subnetwork regions/us-central1/subnetworks/private" in err
    assert "--epochs" not in err.split("1/2 preprocess:")[1].split("\n")[0]
    assert json.loads(out)["labels"] == {"app": "imagebeam"}


@pytest.mark.parametrize("drop, extra, message", [
    ("--trainer_image", (), "--trainer vertex needs --trainer_image"),
    (None, ("--vertex_accelerator_type", "TPU_V9"), "unknown accelerator 'TPU_V9'"),
    (None, ("--epochs", "0"), "--epochs and --batch_size must be at least 1"),
    (None, ("--data", "gs://x/y"), "--data is set by pipelines.run"),
    (None, ("--image_size", "0"), "--image_size wants"),
])
def test_dry_run_refuses_a_job_that_cannot_run(emulator, capsys, drop, extra, message):
    argv = _run_argv(*extra)
    if drop:
        index = argv.index(drop)
        del argv[index:index + 2]
    assert run.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err


def test_local_output_is_refused_for_vertex(capsys):
    argv = _run_argv()
    argv[argv.index(f"gs://{BUCKET}/run")] = "/tmp/run"
    argv = [a for a in argv if a not in ("--runner", "DataflowRunner")]
    assert run.main(argv) == 2
    assert "needs a gs:// --output" in capsys.readouterr().err


class _FakeJobService:
    """Records requests; walks the job through the given states."""

    def __init__(self, states: list[str]) -> None:
        self.created: list[tuple[str, aip.CustomJob]] = []
        self._states = states

    def create_custom_job(self, parent: str, custom_job: aip.CustomJob) -> aip.CustomJob:
        self.created.append((parent, custom_job))
        done = aip.CustomJob(custom_job)
        done.name = f"{parent}/customJobs/123"
        return done

    def get_custom_job(self, name: str) -> aip.CustomJob:
        state = self._states.pop(0) if len(self._states) > 1 else self._states[0]
        job = aip.CustomJob(name=name, state=aip.JobState[state])
        if state == "JOB_STATE_FAILED":
            job.error.message = "out of memory"
        return job


def test_submit_and_follow_with_a_job_service():
    client = _FakeJobService(["JOB_STATE_PENDING", "JOB_STATE_PENDING", "JOB_STATE_RUNNING",
                              "JOB_STATE_SUCCEEDED"])
    job = vertex.build_custom_job(_config(), [])
    created = vertex.submit(job, "my-project", "us-central1", client=client)
    assert client.created == [("projects/my-project/locations/us-central1", job)]
    lines: list[str] = []
    state = vertex.wait(created.name, client, poll_s=0, echo=lines.append, sleep=lambda _: None)
    assert state == aip.JobState.JOB_STATE_SUCCEEDED
    assert [line.rsplit(" ", 1)[1] for line in lines] == [
        "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    failed = _FakeJobService(["JOB_STATE_FAILED"])
    lines.clear()
    assert vertex.wait("j", failed, echo=lines.append, sleep=lambda _: None).name == (
        "JOB_STATE_FAILED")
    assert lines[-1] == "[vertex] error: out of memory"

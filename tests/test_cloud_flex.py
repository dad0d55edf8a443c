"""The Flex Template's metadata against the preprocess CLI, so the two cannot drift apart."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from google.cloud import dataflow_v1beta3 as dataflow_api

from pipelines.cloud import dataflow, flex
from pipelines.preprocessing import options
from pipelines.preprocessing.options import UsageError
from tests.support.demo_data import make_demo_images
from tests.support.gcs_emulator import GcsEmulator
from tests.support.gcs_emulator_tf import TensorFlowGcsBridge

ROOT = Path(__file__).resolve().parent.parent
METADATA = ROOT / flex.METADATA_RELATIVE_PATH
URI_FLAGS = {"input", "labels", "output", "reuse_from", "baseline_stats"}
# Values each parameter must accept (besides its default) and refuse.
GOOD = {
    "input": ["gs://my-bucket/raw", "gs://my.bucket_1/a/b c/"],
    "labels": ["gs://my-bucket/labels.csv"],
    "output": ["gs://my-bucket/prep", "gs://my-bucket"],
    "image_size": ["224", "224,160", "4096", "1,1"],
    "resize": ["crop", "pad"],
    "splits": ["train=0.8,validation=0.1,test=0.1", "train=1", "a=.5,b=0.5", "train=1.0"],
    "num_shards": ["1", "64"],
    "shard_size_mb": ["128", "0.5", "64.25", ".5"],
    "image_format": ["png", "raw"],
    "jpeg_quality": ["1", "95", "100"],
    "max_error_rate": ["0.1", "0", "1", "0.05", "1.0"],
    "near_duplicates": ["keep_together", "report"],
    "near_duplicate_threshold": ["0", "10", "32"],
    "max_pixels": ["100000000", "1"],
    "split_salt": ["my-salt v2"],
    "overwrite": ["true", "false"],
    "reuse_from": ["gs://my-bucket/old"],
    "decode_threads": ["0", "4", "16"],
    "baseline_stats": ["gs://my-bucket/old/stats/statistics.pb"],
}
BAD = {
    "input": ["/local/raw", "gs://", "gs://B/raw", "s3://bucket/raw", "gs://x/raw"],
    "labels": ["labels.csv", "gs://my-bucket"],
    "output": ["out/", "gs:/my-bucket/prep"],
    "image_size": ["0", "224x224", "-1", "10000", "224,"],
    "resize": ["Squash", "letterbox", ""],
    "splits": ["train", "train=2", "1train=0.5", "train=0.8;test=0.2"],
    "num_shards": ["0", "-1", "1.5", "x"],
    "shard_size_mb": ["0", "-1", "x", "0.0"],
    "image_format": ["jpg", "JPEG"],
    "jpeg_quality": ["0", "101", "95.5"],
    "max_error_rate": ["1.5", "-0.1", "ten", ".5"],
    "near_duplicates": ["off", "Report"],
    "near_duplicate_threshold": ["33", "-1", "x", "2.5"],
    "max_pixels": ["0", "1e8", "-5"],
    "split_salt": [""],
    "overwrite": ["yes", "True", ""],
    "reuse_from": ["old"],
    "decode_threads": ["-1", "2.5", "x", "1000"],
    "baseline_stats": ["stats.pb"],
}


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads(METADATA.read_text())


@pytest.fixture(scope="module")
def flags() -> dict[str, argparse.Action]:
    """{parameter name: argparse action} of the preprocess CLI."""
    return {option.removeprefix("--"): action
            for action in options._parser()._actions
            if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings}


def test_metadata_is_valid_for_the_dataflow_api():
    # Strict: an unknown field, a misspelt paramType or a wrong type fails to parse.
    parsed = dataflow_api.TemplateMetadata.from_json(METADATA.read_text(),
                                                     ignore_unknown_fields=False)
    assert parsed.name and parsed.description
    for parameter in parsed.parameters:
        assert parameter.label and parameter.help_text, parameter.name
        assert parameter.param_type != dataflow_api.ParameterType.DEFAULT, parameter.name
        assert parameter.regexes, f"{parameter.name} has no validation regex"


def test_every_cli_option_is_a_parameter_and_nothing_else(metadata, flags):
    names = [p["name"] for p in metadata["parameters"]]
    assert len(names) == len(set(names))
    assert set(names) == set(flags) - set(flex.NOT_PARAMETERS)
    assert set(flex.NOT_PARAMETERS) <= set(flags)


def test_each_parameter_matches_its_option(metadata, flags):
    for parameter in metadata["parameters"]:
        name, action = parameter["name"], flags[parameter["name"]]
        kind, regexes = parameter["paramType"], parameter["regexes"]
        assert parameter["isOptional"] is (not action.required), name
        if action.nargs == 0:  # an on/off switch
            assert kind == "BOOLEAN" and regexes == ["^(true|false)$"], name
            assert parameter["defaultValue"] == "false", name
        elif action.choices:
            assert kind == "ENUM", name
            assert [o["value"] for o in parameter["enumOptions"]] == list(action.choices), name
            assert regexes == [f"^({'|'.join(action.choices)})$"], name
        elif action.type in (int, float):
            assert kind == "NUMBER", name
        elif name in URI_FLAGS:
            assert kind.startswith("GCS_"), name
        else:
            assert kind == "TEXT", name
        if action.default not in (None, False):
            assert parameter.get("defaultValue") == str(action.default).removesuffix(".0"), name
            # The help names the default, as the CLI's does.
            assert "default" in parameter["helpText"], name
            assert parameter["defaultValue"] in parameter["helpText"], name
        else:
            assert "defaultValue" not in parameter or kind == "BOOLEAN", name


def test_regexes_take_the_defaults_and_what_the_cli_takes_and_refuse_the_rest(metadata):
    for parameter in metadata["parameters"]:
        name = parameter["name"]
        patterns = [re.compile(r) for r in parameter["regexes"]]
        good = GOOD[name] + ([parameter["defaultValue"]] if "defaultValue" in parameter else [])
        for value in good:
            assert all(p.fullmatch(value) for p in patterns), (name, value)
            if parameter["paramType"] != "BOOLEAN":
                _parse({name: value})  # the CLI accepts it too
        for value in BAD[name]:
            assert not all(p.fullmatch(value) for p in patterns), (name, value)


def _parse(params: dict[str, str]):
    """What the Flex launcher runs: every parameter as --name=value."""
    params = {"input": "gs://my-bucket/raw", "output": "gs://my-bucket/prep", **params}
    argv = [f"--{name}={value}" for name, value in params.items()]
    return options.parse_args(flex.launcher_argv(argv))


def test_a_launch_with_every_parameter_parses(metadata):
    params = {p["name"]: p.get("defaultValue", GOOD[p["name"]][0])
              for p in metadata["parameters"]}
    params.update(overwrite="true", num_shards="8", image_size="160,128")
    config, _ = _parse(params)
    assert config.overwrite is True and config.num_shards == 8
    assert (config.image.height, config.image.width) == (160, 128)
    assert config.labels_csv == "gs://my-bucket/labels.csv"
    assert _parse({"overwrite": "false"})[0].overwrite is False
    with pytest.raises(UsageError, match="--overwrite wants true or false"):
        flex.launcher_argv(["--overwrite=maybe"])
    # Dataflow's own options pass through untouched.
    assert flex.launcher_argv(["--runner=DataflowRunner", "--overwrite=TRUE"]) == [
        "--runner=DataflowRunner", "--overwrite"]


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_gcloud_builds_the_flex_template_spec(tmp_path):
    image = "us-central1-docker.pkg.dev/my-project/imagebeam/imagebeam-dataflow:1"
    done = subprocess.run(
        ["gcloud", "dataflow", "flex-template", "build", "gs://my-bucket/templates/prep.json",
         "--image", image, "--sdk-language", "PYTHON", "--metadata-file", str(METADATA),
         "--print-only", "--quiet"],
        capture_output=True, text=True, timeout=120,
        # A throwaway config: no account, no project, nothing read from the user's gcloud.
        env={"CLOUDSDK_CONFIG": str(tmp_path), "PATH": "/usr/bin:/bin:/usr/local/bin",
             "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
    )
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout.strip().removeprefix("|-"))
    assert spec["image"] == image and spec["sdkInfo"]["language"] == "PYTHON"
    assert [p["name"] for p in spec["metadata"]["parameters"]] == [
        p["name"] for p in json.loads(METADATA.read_text())["parameters"]]


def test_the_launcher_script_runs_the_cli():
    # As the launcher runs it: a script, its folder first on sys.path, the package installed.
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "flex_main.py"),
                           "--output=gs://my-bucket/prep", "--overwrite=maybe"],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --overwrite wants true or false, got 'maybe'"


def test_a_flex_launch_builds_the_job_to_run_on_the_image(tmp_path, capsys, monkeypatch):
    image = "us-central1-docker.pkg.dev/my-project/imagebeam/imagebeam-dataflow:1"
    bucket = "imagebeam-flex"
    job_object = f"gs://{bucket}/staging/template_launches/1/job_object"
    # What deploy/Dockerfile bakes into the image; the launcher runs inside it.
    monkeypatch.setenv(dataflow.SDK_IMAGE_ENV, image)
    monkeypatch.setenv(dataflow.FLEX_LAUNCH_ENV, "")  # restored after flex.main sets it
    make_demo_images(str(tmp_path), per_class=2, size=(40, 40), seed=0)
    with GcsEmulator() as emulator, TensorFlowGcsBridge(emulator):
        emulator.create_bucket(bucket)
        emulator.upload_folder(tmp_path, f"gs://{bucket}/raw")
        # Parameters as --name=value, then the options the launcher adds.
        code = flex.main([f"--input=gs://{bucket}/raw", f"--output=gs://{bucket}/prep",
                          "--image_size=32", "--overwrite=false", "--runner=DataflowRunner",
                          "--project=my-project", "--region=us-central1",
                          f"--temp_location=gs://{bucket}/tmp",
                          f"--staging_location=gs://{bucket}/staging",
                          f"--template_location={job_object}"])
        err = capsys.readouterr().err
        assert code == 0, err
        job = json.loads(_read(job_object))
        staged = [m.path.rsplit("/", 1)[1] for m in FileSystems.match(
            [f"gs://{bucket}/staging/**"])[0].metadata_list]
        pipeline = beam_runner_api_pb2.Pipeline.FromString(
            _read(next(m.path for m in FileSystems.match(
                [f"gs://{bucket}/staging/**/pipeline.pb"])[0].metadata_list)))
    assert f"Dataflow workers: container {image}" in err
    assert "Flex Template launch: job handed to Dataflow" in err
    assert "classic template" not in err
    assert job["environment"]["sdkPipelineOptions"]["options"]["sdk_container_image"] == image
    # The image holds the code and the pins: no wheel, no requirements to install.
    assert not [name for name in staged if name.endswith(".whl") or name == "requirements.txt"]
    images = {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
              for env in pipeline.components.environments.values()
              if env.urn == common_urns.environments.DOCKER.urn}
    assert images == {image}


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()

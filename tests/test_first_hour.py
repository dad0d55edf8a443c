"""The first hour on Google Cloud (issue 21), command by command: without credentials or
network every cloud command ends in seconds with one line and exit 2; `--dry_run` prints the
plan touching nothing; `--dry_run --check` makes the online checks (against fake-gcs-server);
deploy/setup.sh; and no token or key in anything printed.

Commands are called in-process (their entry functions, as `python -m` calls them) so that
the timings are the commands' own, not Python's imports; one subprocess runs the issue's
command as a new user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.cloud import aiplatform_v1 as aip

from pipelines import preprocess, run
from pipelines.prediction import command as predict
from pipelines.retraining import tick
from tests.support.demo_data import make_demo_images
from tests.support.gcs_emulator import GcsEmulator
from tests.test_cloud_access import (
    FAKE_CLIENT_SECRET,
    FAKE_REFRESH_TOKEN,
    closed_port,
    new_user_machine,
    refuse_network,
    write_user_credentials,
)

ROOT = Path(__file__).resolve().parent.parent
DATAFLOW = ["--project", "p", "--region", "us-central1", "--runner", "DataflowRunner",
            "--temp_location", "gs://b/tmp"]
# The command of the issue, as a new user typed it.
ISSUE_COMMAND = ["--input", "gs://b/raw", "--output", "gs://b/runs/1", "--trainer", "vertex",
                 "--trainer_image", "IMAGE", *DATAFLOW]
COMMANDS = {  # name -> (entry function, argv): every command that touches Google Cloud
    "preprocess gs://": (preprocess.run, ["--input", "gs://b/raw", "--output", "gs://b/prep"]),
    "preprocess on Dataflow": (preprocess.run, ["--input", "gs://b/raw", "--output",
                                                "gs://b/prep", *DATAFLOW]),
    "run on Dataflow + Vertex AI": (run.main, ISSUE_COMMAND),
    "run, local input, Vertex AI": (run.main, ["--input", "raw", "--output", "gs://b/runs/2",
                                               "--trainer", "vertex", "--trainer_image", "I",
                                               "--project", "p", "--region", "us-central1"]),
    "retrain": (tick.run, ["--input", "gs://b/raw", "--root", "gs://b/retrain"]),
    "predict": (predict.run, ["--model", "gs://b/model", "--input", "gs://b/raw",
                              "--output", "gs://b/predictions"]),
}
SETUP = ROOT / "deploy" / "setup.sh"


@pytest.fixture
def no_cloud(tmp_path, monkeypatch):
    """A new user's machine (test_cloud_access.new_user_machine), working in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return new_user_machine(tmp_path, monkeypatch)


@pytest.fixture
def no_network(monkeypatch):
    return refuse_network(monkeypatch)


def _call(entry, argv, capfd) -> tuple[int, str, str, float]:
    capfd.readouterr()
    started = time.monotonic()
    code = entry(list(argv))
    elapsed = time.monotonic() - started
    out, err = capfd.readouterr()
    return code, out, err, elapsed


@pytest.mark.parametrize("name", COMMANDS)
def test_without_credentials_every_cloud_command_is_one_line_and_exit_2(
        name, no_cloud, no_network, capfd):
    (no_cloud.parent / "raw").mkdir(exist_ok=True)
    entry, argv = COMMANDS[name]
    code, out, err, elapsed = _call(entry, argv, capfd)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("error: Google Cloud credentials are needed")
    assert "gcloud auth application-default login" in err
    assert elapsed < 10
    assert no_network == []  # found out without a single connection or DNS lookup


def test_with_credentials_but_no_network_each_endpoint_is_one_line(no_cloud, monkeypatch,
                                                                   capfd):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       write_user_credentials(no_cloud / "adc.json"))
    port = closed_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    code, out, err, elapsed = _call(
        preprocess.run, [*COMMANDS["preprocess on Dataflow"][1], "--dataflow_endpoint",
                         f"http://127.0.0.1:{closed_port()}"], capfd)
    assert (code, out) == (2, "") and err.count("\n") == 1 and elapsed < 10
    assert err.startswith("error: cannot reach the GCS emulator (STORAGE_EMULATOR_HOST): "
                          f"127.0.0.1:{port} refused the connection")
    # A name that does not resolve (the .invalid domain never does).
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://storage.imagebeam-test.invalid:4443")
    code, out, err, elapsed = _call(tick.run, COMMANDS["retrain"][1], capfd)
    assert (code, out) == (2, "") and err.count("\n") == 1 and elapsed < 10
    assert "storage.imagebeam-test.invalid does not resolve (DNS)" in err
    assert FAKE_REFRESH_TOKEN not in err and FAKE_CLIENT_SECRET not in err


def test_dry_runs_print_the_whole_plan_and_touch_no_cloud(no_cloud, no_network, capfd):
    code, out, err, elapsed = _call(run.main, [*ISSUE_COMMAND, "--dry_run",
                                               "--machine_type", "n2-standard-4"], capfd)
    assert code == 0 and elapsed < 10, err
    job = aip.CustomJob.from_json(out, ignore_unknown_fields=False)  # the request body
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://b/runs/1/model"
    for expected in (
            "Google Cloud is not contacted",
            "Dataflow job in p/us-central1", "temp gs://b/tmp", "workers: n2-standard-4",
            "worker setup: Beam's stock container + a wheel of the project",
            "reads: --input gs://b/raw", "writes: gs://b/runs/1/prep/",
            "2/2 train on Vertex AI in p/us-central1: g2-standard-8 + 1 x NVIDIA_L4",
            "writes: gs://b/runs/1/model/",
            "rough cost", "Dataflow: ~$0.004 per GB of input", "Vertex AI: ~$1.00 per hour",
            "checked at run time", "whether gs://b/runs/1/prep can be reused",
            "the Dataflow API is enabled"):
        assert expected in err, expected
    assert "Traceback" not in err

    code, out, err, _ = _call(preprocess.run, [*COMMANDS["preprocess on Dataflow"][1],
                                               "--dry_run", "--sdk_container_image", "r/i:1"],
                              capfd)
    assert (code, out) == (0, ""), err
    assert "worker setup: container r/i:1" in err and "checked at run time" in err

    code, out, err, _ = _call(tick.run, [*COMMANDS["retrain"][1], *DATAFLOW[4:], "--project",
                                         "p", "--region", "us-central1", "--trainer",
                                         "vertex", "--trainer_image", "IMAGE", "--dry_run"],
                              capfd)
    assert code == 0, err
    job = aip.CustomJob.from_json(out, ignore_unknown_fields=False)
    assert job.job_spec.worker_pool_specs[0].container_spec.args[-4:] == [
        "--data", "gs://b/retrain/runs/<UTC time>/data",
        "--model_dir", "gs://b/retrain/runs/<UTC time>/model"]
    assert "swap gs://b/retrain/current.json" in err and "checked at run time" in err
    assert no_network == []


def test_dry_run_check_makes_the_online_checks(no_cloud, tmp_path, capfd):
    make_demo_images(str(tmp_path / "photos"), per_class=2, size=(40, 40), seed=0)
    bucket = "imagebeam-first-hour"
    with GcsEmulator() as emulator:  # sets STORAGE_EMULATOR_HOST and fake credentials
        emulator.create_bucket(bucket)
        emulator.upload_folder(tmp_path / "photos", f"gs://{bucket}/raw")
        files = sorted((tmp_path / "photos").rglob("*.*"))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        argv = ["--input", f"gs://{bucket}/raw", "--output", f"gs://{bucket}/prep",
                *DATAFLOW[:-1], f"gs://{bucket}/tmp", "--dry_run", "--check",
                "--dataflow_endpoint", emulator.url]  # an endpoint that answers
        code, out, err, elapsed = _call(preprocess.run, argv, capfd)
    assert (code, out) == (0, ""), err
    assert elapsed < 10
    assert "checked: credentials user credentials" in err
    assert f"checked: gs://{bucket}/raw holds {len(files)} files, {megabytes:.1f} MB" in err
    assert f"checked: gs://{bucket}/prep does not exist or is empty" in err
    assert f"for {len(files)} files, {megabytes:.1f} MB (listed on GCS (--check))" in err
    assert "checked at run time" not in err


def test_no_token_or_key_material_in_anything_printed(no_cloud, monkeypatch, capfd):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    service_account = no_cloud / "key.json"
    service_account.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "0123abcdfakekeyid",
        "private_key": pem, "client_email": "runner@p.iam.gserviceaccount.com",
        "client_id": "1234", "token_uri": "https://oauth2.googleapis.com/token"}))
    secrets = ["0123abcdfakekeyid", *pem.splitlines()[1:-1], FAKE_REFRESH_TOKEN,
               FAKE_CLIENT_SECRET]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed_port()}")
    printed = []
    for credentials in (str(service_account), write_user_credentials(no_cloud / "adc.json")):
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", credentials)
        for argv in (ISSUE_COMMAND, [*ISSUE_COMMAND, "--dry_run"],
                     [*ISSUE_COMMAND, "--dry_run", "--check"]):
            code, out, err, _ = _call(run.main, argv, capfd)
            printed.append(out + err)
            assert code == (0 if argv[-1] == "--dry_run" else 2), err
    assert "credentials are needed" not in "".join(printed)  # both files were usable
    assert "cannot reach" in printed[0]
    for secret in secrets:
        assert not any(secret in text for text in printed), secret


def test_the_issue_command_in_a_fresh_process(tmp_path):
    """In a process of its own, as `python -m pipelines.run` runs it (Python's default
    logging, no test capture): the dry run's plan and JSON, then the real command's one
    line. One process for both, to pay Beam's and the Vertex AI client's imports once;
    before this check the dry run alone took minutes (credential retries, a GCS call)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GOOGLE_", "STORAGE_EMULATOR", "CLOUDSDK"))}
    env.update(HOME=str(home), CLOUDSDK_CONFIG=str(home))
    script = ("import sys, time; from pipelines import run\n"
              f"argv = {ISSUE_COMMAND!r}\n"
              "started = time.monotonic(); dry = run.main([*argv, '--dry_run'])\n"
              "print(f'=== {dry} {time.monotonic() - started:.1f}', file=sys.stderr)\n"
              "started = time.monotonic(); real = run.main(argv)\n"
              "print(f'=== {real} {time.monotonic() - started:.1f}', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["jobSpec"]["workerPoolSpecs"][0]["containerSpec"][
        "imageUri"] == "IMAGE"
    plan, dry_status_and_real, real_status = done.stderr.split("=== ")
    dry_status, real = dry_status_and_real.split("\n", 1)
    assert "[run] checked at run time" in plan and "Traceback" not in plan
    assert int(dry_status.split()[0]) == 0 and float(dry_status.split()[1]) < 10
    assert real.count("\n") == 1, real
    assert real.startswith("error: Google Cloud credentials are needed")
    assert int(real_status.split()[0]) == 2 and float(real_status.split()[1]) < 10


# ------------------------------------------------------------------ deploy/setup.sh

# What the README's "Once per project" section had users paste, before setup.sh.
README_LIST = (
    "gcloud services enable dataflow.googleapis.com --project my-project",
    "gcloud services enable aiplatform.googleapis.com --project my-project",
    "gcloud services enable artifactregistry.googleapis.com --project my-project",
    "gcloud services enable cloudbuild.googleapis.com --project my-project",
    "gcloud storage buckets create gs://my-bucket --location us-central1 --project my-project",
    "gcloud artifacts repositories create imagebeam --repository-format docker --location "
    "us-central1 --project my-project",
    "gcloud iam service-accounts create imagebeam-runner --project my-project",
    *(f"gcloud projects add-iam-policy-binding my-project --member serviceAccount:{SA} "
      f"--role {role}" for SA in ["imagebeam-runner@my-project.iam.gserviceaccount.com"]
      for role in ("roles/dataflow.worker", "roles/aiplatform.user",
                   "roles/artifactregistry.reader", "roles/logging.logWriter")),
    "gcloud storage buckets add-iam-policy-binding gs://my-bucket --member serviceAccount:"
    "imagebeam-runner@my-project.iam.gserviceaccount.com --role roles/storage.objectAdmin",
    "gcloud iam service-accounts add-iam-policy-binding imagebeam-runner@my-project.iam."
    "gserviceaccount.com --project my-project --member user:",
)

# A stand-in for gcloud: keeps what exists in a JSON file and logs every call. Enough of
# gcloud's look-up and create commands to run setup.sh twice.
FAKE_GCLOUD = r'''#!/usr/bin/python3 -S
import json, os, sys
args = sys.argv[1:]
state_path = os.environ["FAKE_GCLOUD_STATE"]
state = set(json.load(open(state_path))) if os.path.exists(state_path) else set()
with open(state_path + ".log", "a") as log:
    log.write(" ".join(args) + "\n")
flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
def value(flag):
    return args[args.index(flag) + 1]
def binding_key(target):
    role, member = flags["--filter"].split(" AND ")
    return f"binding {target} {role.split('=')[1]} {member.split('=', 1)[1]}"
VALUE_FLAGS = {"--project", "--location", "--repository-format", "--member", "--role",
               "--condition"}
words, skip = [], False
for a in args:
    if skip or a.startswith("-"):
        skip = not skip and a in VALUE_FLAGS
        continue
    words.append(a)
if args[:3] == ["config", "get-value", "account"]:
    print("me@example.com"); sys.exit(0)
if args[:2] == ["services", "list"]:
    name = flags["--filter"].split("=")[1]
    print(name if f"api {name}" in state else ""); sys.exit(0)
if args[:2] == ["services", "enable"]:
    state.add(f"api {args[2]}")
elif "describe" in words:
    thing = " ".join(words[:words.index("describe")] + words[words.index("describe") + 1:])
    if thing not in state:
        sys.exit(1)
    print(thing); sys.exit(0)
elif "create" in words:
    i = words.index("create")
    name = words[i + 1]
    if words[0] == "iam":
        name = f"{name}@{value('--project')}.iam.gserviceaccount.com"
    state.add(" ".join(words[:i] + [name]))
elif "get-iam-policy" in words:
    key = binding_key(words[words.index("get-iam-policy") + 1])
    print(key.split()[2] if key in state else ""); sys.exit(0)
elif "add-iam-policy-binding" in words:
    target = words[words.index("add-iam-policy-binding") + 1]
    state.add(f"binding {target} {value('--role')} {value('--member')}")
else:
    sys.exit(f"fake gcloud: unknown command {args}")
json.dump(sorted(state), open(state_path, "w"))
'''


def test_setup_print_lists_what_the_readme_listed_and_runs_nothing(tmp_path):
    # No gcloud on PATH: --print runs nothing, not even the look-ups.
    done = subprocess.run([shutil.which("bash"), str(SETUP), "my-project", "us-central1",
                           "my-bucket", "--print"], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    for expected in README_LIST:
        assert any(line.startswith(expected) for line in commands), expected
    assert len(commands) == len(README_LIST)
    usage = subprocess.run(["bash", str(SETUP), "only-a-project"], capture_output=True,
                           text=True, timeout=30)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: deploy/setup.sh")


def test_setup_creates_once_and_a_second_run_changes_nothing(tmp_path):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    state = tmp_path / "state.json"
    env = {"PATH": os.environ["PATH"], "GCLOUD": str(gcloud), "FAKE_GCLOUD_STATE": str(state)}
    log = Path(f"{state}.log")

    def setup() -> tuple[str, list[str]]:
        before = len(log.read_text().splitlines()) if log.exists() else 0
        done = subprocess.run(["bash", str(SETUP), "my-project", "us-central1", "gs://my-bucket"],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout, log.read_text().splitlines()[before:]

    out, calls = setup()
    changes = [c for c in calls if any(w in c.split() for w in (
        "create", "enable", "add-iam-policy-binding"))]
    assert len(changes) == len(README_LIST) and out.count("[setup] creating:") == len(changes)
    assert "export SA=imagebeam-runner@my-project.iam.gserviceaccount.com" in out
    out, calls = setup()
    assert not [c for c in calls if any(w in c.split() for w in (
        "create", "enable", "add-iam-policy-binding"))]
    assert out.count("[setup] present:") == len(README_LIST) and "creating" not in out

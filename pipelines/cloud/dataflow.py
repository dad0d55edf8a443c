"""Submitting the preprocessing job to Dataflow: checks, what workers install, following it.

`prepare` runs before the pipeline is built and only for the DataflowRunner:

- the job needs no local files at run time: --input/--labels/--output/--reuse_from must be
  gs:// URIs, and --project, --region and a gs:// --temp_location are required;
- the workers get the project's code and its pinned dependencies, in one of two ways:

  container mode (recommended, and what the Flex Template uses) -- `--sdk_container_image`
      names an image built from deploy/Dockerfile, which holds the project and every
      dependency from deploy/requirements.txt; nothing is staged and workers start in
      about a minute. Inside that image (the Flex launcher) it is the default.
  package mode (the default without an image: nothing to build, only a bucket) -- a wheel
      of the project is built here and staged with --extra_package, and the lock
      deploy/requirements.txt is staged as --requirements_file with
      --requirements_cache=skip, so each worker pip-installs the pinned versions from PyPI
      when it starts (a few minutes per worker for TensorFlow; workers need internet
      access: public IPs or Cloud NAT). Submission stays fast because nothing is
      downloaded here.

  Options the caller gave (--setup_file, --extra_package, --requirements_file) are left
  alone and nothing is added.

Credentials are never handled here: Beam and the Google clients use Application Default
Credentials (`gcloud auth application-default login` locally, the attached service
account on Google Cloud); pass --service_account_email to choose the workers' identity.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.runner import PipelineResult

from pipelines.cloud import packaging
from pipelines.preprocessing.options import PreprocessConfig, UsageError

# Set in deploy/Dockerfile to the image's own URI: inside it, workers default to it.
SDK_IMAGE_ENV = "IMAGEBEAM_SDK_CONTAINER_IMAGE"
# Set by pipelines.cloud.flex for a Flex Template launch (the launcher builds the job at launch
# time, so the classic template's caveats do not apply).
FLEX_LAUNCH_ENV = "IMAGEBEAM_FLEX_LAUNCH"
DATAFLOW_RUNNERS = ("dataflowrunner", "dataflow")
_JOB_LOGGER = "apache_beam.runners.dataflow.dataflow_runner"  # Beam logs job messages here


def is_dataflow(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return isinstance(runner, str) and runner.lower() in DATAFLOW_RUNNERS


def check(config: PreprocessConfig, options: PipelineOptions) -> None:
    """Raises UsageError for a Dataflow submission that cannot work; no side effects.

    Other runners pass. Dataflow needs --project, --region and a gs:// --temp_location,
    and its workers read and write gs:// only.
    """
    if not is_dataflow(options):
        return
    gcp = options.view_as(GoogleCloudOptions)
    missing = [flag for flag, value in (("--project", gcp.project), ("--region", gcp.region),
                                        ("--temp_location", gcp.temp_location)) if not value]
    if missing:
        raise UsageError(f"the DataflowRunner needs {', '.join(missing)}")
    for flag, value in (("--temp_location", gcp.temp_location),
                        ("--staging_location", gcp.staging_location),
                        ("--template_location", gcp.template_location)):
        if value and not value.startswith("gs://"):
            raise UsageError(f"{flag} must be a gs:// URI on Dataflow, got {value!r}")
    local = [f"{flag} {uri}" for flag, uri in (
        ("--input", config.input), ("--labels", config.labels_csv), ("--output", config.output),
        ("--reuse_from", config.reuse_from)) if uri and not uri.startswith("gs://")]
    if local:
        raise UsageError(f"Dataflow workers cannot read local paths: {'; '.join(local)} "
                         "(upload them and give gs:// URIs)")


def prepare(
    config: PreprocessConfig, options: PipelineOptions, environ: Mapping[str, str] | None = None
) -> PipelineOptions:
    """Checks and completes the options of a Dataflow submission; other runners pass through.

    Raises UsageError (see `check`). Names the job, chooses what workers install (may
    build the project's wheel: package mode). Returns `options`, updated.
    """
    if not is_dataflow(options):
        return options
    environ = os.environ if environ is None else environ
    check(config, options)
    gcp = options.view_as(GoogleCloudOptions)
    if not gcp.job_name:
        gcp.job_name = time.strftime("imagebeam-preprocess-%Y%m%d-%H%M%S", time.gmtime())
    setup = options.view_as(SetupOptions)
    if setup.save_main_session is None:
        # Beam pickles __main__ for Dataflow by default; every function the job runs lives in
        # the installed package (the DirectRunner's worker processes run it the same way).
        setup.save_main_session = False
    print(f"[preprocess] Dataflow workers: {configure_workers(options, environ)}",
          file=sys.stderr)
    if gcp.template_location and not environ.get(FLEX_LAUNCH_ENV):
        print("[preprocess] classic template: the input listing, the label vocabulary and "
              "--output are fixed now, at build time, and --output is claimed now; every run "
              "of the template checks that claim first and refuses to run if an earlier run "
              "used it. Use the Flex Template (deploy/) for parameters chosen at launch.",
              file=sys.stderr)
    return options


def worker_setup(options: PipelineOptions, environ: Mapping[str, str]) -> str:
    """How workers would get the project and its dependencies, in one line; changes and
    builds nothing (what `--dry_run` shows)."""
    setup = options.view_as(SetupOptions)
    image = options.view_as(WorkerOptions).sdk_container_image or environ.get(SDK_IMAGE_ENV)
    if image:
        return f"container {image} (project and pinned dependencies preinstalled; nothing staged)"
    if setup.setup_file or setup.extra_packages or setup.requirements_file:
        return "as given by --setup_file / --extra_package / --requirements_file"
    return (f"Beam's stock container + a wheel of the project, built here at submission, + "
            f"pinned {packaging.LOCK_RELATIVE_PATH} (installed at worker start-up; "
            "--sdk_container_image starts faster)")


def configure_workers(options: PipelineOptions, environ: Mapping[str, str]) -> str:
    """Chooses how workers get the project and its dependencies; returns a one-line summary."""
    setup = options.view_as(SetupOptions)
    worker = options.view_as(WorkerOptions)
    if not worker.sdk_container_image and environ.get(SDK_IMAGE_ENV):
        worker.sdk_container_image = environ[SDK_IMAGE_ENV]
    if worker.sdk_container_image or setup.setup_file or setup.extra_packages or (
            setup.requirements_file):
        return worker_setup(options, environ)
    try:
        lock = packaging.lock_path()
        wheel = packaging.build_wheel(_scratch_dir())
    except packaging.PackagingError as err:
        raise UsageError(str(err)) from err
    if not lock.is_file():
        raise UsageError(f"{lock} is missing: run `python -m pipelines.cloud.packaging lock`")
    setup.extra_packages = [str(wheel)]
    setup.requirements_file = str(lock)
    if setup.requirements_cache is None:
        # Workers install the pins from PyPI; downloading ~1 GB of wheels here to stage them
        # would make every submission slow.
        setup.requirements_cache = "skip"
    if options.view_as(WorkerOptions).use_public_ips is False:
        print("[preprocess] warning: with --no_use_public_ips, workers reach PyPI only "
              "through Cloud NAT; without it use --sdk_container_image", file=sys.stderr)
    return (f"Beam's stock container + staged {wheel.name} + pinned {packaging.LOCK_RELATIVE_PATH}"
            " (installed at worker start-up; --sdk_container_image starts faster)")


def follow(result: PipelineResult, config: PreprocessConfig, options: PipelineOptions,
           environ: Mapping[str, str] | None = None) -> int:
    """After `pipeline.run()` on a remote runner: report, wait for the job, return an exit code.

    A classic template or a Flex launch creates no job here, so nothing is waited for.
    A Dataflow job is followed to its end, Beam's job messages shown on stderr, so that
    the manifest exists when this returns 0 (pipelines.run trains on it next).
    """
    environ = os.environ if environ is None else environ
    gcp = options.view_as(GoogleCloudOptions)
    if gcp.template_location and not environ.get(FLEX_LAUNCH_ENV):
        print(f"[preprocess] classic template written to {gcp.template_location}; run it with\n"
              f"  gcloud dataflow jobs run JOB_NAME --gcs-location {gcp.template_location} "
              f"--region {gcp.region} --project {gcp.project}", file=sys.stderr)
        return 0
    if environ.get(FLEX_LAUNCH_ENV):
        # The launcher VM only builds and hands over the job; it must not babysit it.
        print("[preprocess] Flex Template launch: job handed to Dataflow", file=sys.stderr)
        return 0
    if not is_dataflow(options):
        result.wait_until_finish()
        print(f"[preprocess] done: {config.output}/manifest.json", file=sys.stderr)
        return 0
    job_id = result.job_id()
    print(f"[preprocess] Dataflow job {job_id}: https://console.cloud.google.com/dataflow/jobs/"
          f"{gcp.region}/{job_id}?project={gcp.project}\n[preprocess] waiting for it to finish "
          "(Ctrl-C stops waiting, not the job)", file=sys.stderr)
    _show_job_messages()
    try:
        result.wait_until_finish()
    except KeyboardInterrupt:
        print(f"[preprocess] stopped waiting; cancel with: gcloud dataflow jobs cancel {job_id} "
              f"--region {gcp.region}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - DataflowRuntimeException and API errors alike
        print(f"error: Dataflow job {job_id} failed: {err}", file=sys.stderr)
        return 1
    print(f"[preprocess] Dataflow job {job_id} done: {config.output}/manifest.json",
          file=sys.stderr)
    return 0


def _show_job_messages() -> None:
    # preprocess.run keeps the root logger at WARNING; the job's progress is INFO.
    logger = logging.getLogger(_JOB_LOGGER)
    if not any(getattr(h, "_imagebeam", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[dataflow] %(message)s"))
        handler._imagebeam = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def is_classic_template(options: PipelineOptions,
                        environ: Mapping[str, str] | None = None) -> bool:
    """A classic template build: the job runs later (maybe many times), not here."""
    environ = os.environ if environ is None else environ
    return bool(options.view_as(GoogleCloudOptions).template_location
                and not environ.get(FLEX_LAUNCH_ENV))


def waits_for_job(options: PipelineOptions, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process follows the job to its end (`follow`): not for a classic
    template build or a Flex launch, which hand the job over and exit."""
    environ = os.environ if environ is None else environ
    return not (is_classic_template(options, environ) or environ.get(FLEX_LAUNCH_ENV))


_SCRATCH_DIRS: list[str] = []


def _scratch_dir() -> str:
    # Lives until pipeline.run() has staged the wheel; removed by remove_scratch_dirs(),
    # and at exit for callers that never call it.
    path = tempfile.mkdtemp(prefix="imagebeam-wheel-")
    _SCRATCH_DIRS.append(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def remove_scratch_dirs() -> None:
    """Removes the staged wheel's folders now: preprocess ends with os._exit, which runs
    no atexit handler."""
    while _SCRATCH_DIRS:
        shutil.rmtree(_SCRATCH_DIRS.pop(), ignore_errors=True)

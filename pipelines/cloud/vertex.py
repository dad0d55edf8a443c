"""The trainer as a Vertex AI CustomJob: one GPU worker running the trainer image.

The job is built from `google.cloud.aiplatform_v1` types, so an unknown field or a
wrong enum value (an accelerator name, say) fails here, before anything is sent;
`job_json` is the exact body of `projects.locations.customJobs.create`.

Vertex AI sets AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR from
`base_output_directory` (…/model, …/checkpoints, …/logs), and trainer.config honours
them: the SavedModel lands where Vertex's model upload looks for it and a restarted
job resumes from its checkpoints. Identity: the job runs as `service_account` (or
Vertex's default); no key is passed anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Sequence

from google.cloud import aiplatform_v1 as aip

# L4 (24 GB, Ada): the cheapest current GPU that trains the models here well; g2 machines
# come with it built in. n1-standard-8 + NVIDIA_TESLA_T4 is the older, similar-cost choice.
DEFAULT_MACHINE_TYPE = "g2-standard-8"
DEFAULT_ACCELERATOR = "NVIDIA_L4"
DEFAULT_ACCELERATOR_COUNT = 1
DEFAULT_BOOT_DISK_GB = 100
TRAINER_COMMAND = ("python", "-m", "trainer.task")
# GPU machine families and the accelerators they can carry (Vertex AI training). Families
# not listed are not checked here; Vertex checks them on submission.
FAMILY_ACCELERATORS: dict[str, frozenset[str]] = {
    "n1-": frozenset({"NVIDIA_TESLA_T4", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P100",
                      "NVIDIA_TESLA_P4"}),
    "g2-": frozenset({"NVIDIA_L4"}),
    "a2-highgpu-": frozenset({"NVIDIA_TESLA_A100"}),
    "a2-megagpu-": frozenset({"NVIDIA_TESLA_A100"}),
    "a2-ultragpu-": frozenset({"NVIDIA_A100_80GB"}),
    "a3-highgpu-": frozenset({"NVIDIA_H100_80GB"}),
    "a3-megagpu-": frozenset({"NVIDIA_H100_MEGA_80GB"}),
    "a3-ultragpu-": frozenset({"NVIDIA_H200_141GB"}),
    "a4-highgpu-": frozenset({"NVIDIA_B200"}),
}
_TERMINAL = frozenset({aip.JobState.JOB_STATE_SUCCEEDED, aip.JobState.JOB_STATE_FAILED,
                       aip.JobState.JOB_STATE_CANCELLED, aip.JobState.JOB_STATE_EXPIRED})


class SpecError(ValueError):
    """The job cannot be specified as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class VertexConfig:
    """Where and on what the trainer runs."""

    project: str
    region: str
    image_uri: str  # the trainer image (deploy/Dockerfile, --target trainer)
    base_output_dir: str  # gs:// prefix; Vertex derives the AIP_* directories from it
    machine_type: str = DEFAULT_MACHINE_TYPE
    accelerator_type: str = DEFAULT_ACCELERATOR  # an aiplatform_v1.AcceleratorType name, or none
    accelerator_count: int = DEFAULT_ACCELERATOR_COUNT
    # Machines in all; more than one trains with MultiWorkerMirroredStrategy: pool 0 is the
    # chief, pool 1 the other workers, and Vertex sets TF_CONFIG on each of them.
    replica_count: int = 1
    boot_disk_gb: int = DEFAULT_BOOT_DISK_GB
    service_account: str | None = None
    network: str | None = None  # projects/NUMBER/global/networks/NAME (VPC peering)
    display_name: str | None = None
    timeout_hours: float | None = None
    labels: tuple[tuple[str, str], ...] = (("app", "imagebeam"),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Vertex AI flags, as `pipelines.run` and `pipelines.retrain` both take them."""
    group = parser.add_argument_group("Vertex AI (--trainer vertex)")
    group.add_argument("--trainer_image", metavar="URI",
                       help="the trainer image (deploy/Dockerfile --target trainer)")
    group.add_argument("--vertex_machine_type", default=DEFAULT_MACHINE_TYPE,
                       help=f"default {DEFAULT_MACHINE_TYPE}")
    group.add_argument("--vertex_accelerator_type", default=DEFAULT_ACCELERATOR,
                       help=f"an AcceleratorType name or none (default {DEFAULT_ACCELERATOR})")
    group.add_argument("--vertex_accelerator_count", type=int,
                       default=DEFAULT_ACCELERATOR_COUNT)
    group.add_argument("--vertex_boot_disk_gb", type=int, default=DEFAULT_BOOT_DISK_GB)
    group.add_argument("--vertex_replica_count", type=int, default=1,
                       help="machines; more than one trains with MultiWorkerMirroredStrategy "
                       "(Vertex sets TF_CONFIG; --batch_size stays the global batch)")
    group.add_argument("--vertex_region", help="default: Beam's --region")
    group.add_argument("--vertex_network", metavar="projects/NUMBER/global/networks/NAME",
                       help="VPC network peered with Vertex AI (default: none)")
    group.add_argument("--vertex_timeout_hours", type=float,
                       help="stop the job after this long (default: Vertex's, 7 days)")
    group.add_argument("--vertex_display_name", help="default imagebeam-train-<time>")


def config_from_args(args: argparse.Namespace, *, project: str | None, region: str | None,
                     service_account: str | None, base_output_dir: str, where: str,
                     trainer_args: Sequence[str]) -> VertexConfig:
    """The VertexConfig the flags of `add_arguments` describe, checked by building a job
    now. `where` names the flag whose gs:// prefix `base_output_dir` lies under. Raises
    SpecError with a one-line message."""
    region = args.vertex_region or region
    missing = [flag for flag, value in (("--trainer_image", args.trainer_image),
                                        ("--project", project),
                                        ("--region (or --vertex_region)", region)) if not value]
    if missing:
        raise SpecError(f"--trainer vertex needs {', '.join(missing)}")
    if not base_output_dir.startswith("gs://"):
        raise SpecError(f"--trainer vertex needs a gs:// {where} (the job reads and writes it)")
    config = VertexConfig(
        project=project,
        region=region,
        image_uri=args.trainer_image,
        base_output_dir=base_output_dir,
        machine_type=args.vertex_machine_type,
        accelerator_type=args.vertex_accelerator_type,
        accelerator_count=args.vertex_accelerator_count,
        replica_count=args.vertex_replica_count,
        boot_disk_gb=args.vertex_boot_disk_gb,
        service_account=service_account,
        network=args.vertex_network,
        display_name=args.vertex_display_name,
        timeout_hours=args.vertex_timeout_hours,
    )
    try:
        build_custom_job(config, trainer_args)
    except (ValueError, TypeError) as err:  # SpecError is a ValueError
        raise SpecError(f"Vertex AI job: {err}") from err
    return config


def accelerator(name: str) -> aip.AcceleratorType:
    """'NVIDIA_L4' -> AcceleratorType.NVIDIA_L4; SpecError listing the valid names."""
    try:
        return aip.AcceleratorType[name.upper()]
    except KeyError:
        valid = ", ".join(a.name for a in aip.AcceleratorType if a.value)
        raise SpecError(f"unknown accelerator {name!r}; one of: {valid}") from None


def check_machine(machine_type: str, accelerator_type: str, count: int) -> None:
    """Fails fast on a machine that cannot carry the accelerator (SpecError)."""
    if not re.fullmatch(r"[a-z][a-z0-9]*-[a-z0-9-]+", machine_type):
        raise SpecError(f"not a machine type: {machine_type!r} (e.g. {DEFAULT_MACHINE_TYPE})")
    if accelerator_type.lower() == "none":
        return  # CPU only; the count means nothing then
    accelerator(accelerator_type)
    if count < 1:
        raise SpecError("--vertex_accelerator_count must be at least 1 with an accelerator")
    family = max((f for f in FAMILY_ACCELERATORS if machine_type.startswith(f)),
                 key=len, default=None)
    if family and accelerator_type.upper() not in FAMILY_ACCELERATORS[family]:
        carried = " or ".join(sorted(FAMILY_ACCELERATORS[family]))
        raise SpecError(f"{machine_type} carries {carried}, not {accelerator_type}")


def build_custom_job(config: VertexConfig, trainer_args: Sequence[str]) -> aip.CustomJob:
    """The CustomJob: `config.replica_count` machines of `config.machine_type` running the
    trainer with `trainer_args` (the chief in worker pool 0, the others in pool 1).

    Raises SpecError for values Vertex would refuse that can be told here.
    """
    if config.replica_count < 1:
        raise SpecError("--vertex_replica_count must be at least 1")
    if not config.base_output_dir.startswith("gs://"):
        raise SpecError(f"Vertex AI writes to gs:// only, got {config.base_output_dir!r}")
    if not re.fullmatch(r"[^\s/]+(/[^\s/]+)*(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})?",
                        config.image_uri):
        raise SpecError(f"not a container image URI: {config.image_uri!r}")
    check_machine(config.machine_type, config.accelerator_type, config.accelerator_count)
    machine = aip.MachineSpec(machine_type=config.machine_type)
    if config.accelerator_type.lower() != "none":
        machine.accelerator_type = accelerator(config.accelerator_type)
        machine.accelerator_count = config.accelerator_count

    def pool(replicas: int) -> aip.WorkerPoolSpec:
        return aip.WorkerPoolSpec(
            machine_spec=machine,
            replica_count=replicas,
            disk_spec=aip.DiskSpec(boot_disk_type="pd-ssd", boot_disk_size_gb=config.boot_disk_gb),
            container_spec=aip.ContainerSpec(
                image_uri=config.image_uri,
                # Explicit, so the image's entrypoint (Beam's boot in the Dataflow image)
                # does not matter.
                command=list(TRAINER_COMMAND),
                args=list(trainer_args),
                # Unbuffered: progress reaches Cloud Logging as it happens.
                env=[aip.EnvVar(name="PYTHONUNBUFFERED", value="1")],
            ),
        )

    pools = [pool(1)] + ([pool(config.replica_count - 1)] if config.replica_count > 1 else [])
    spec = aip.CustomJobSpec(
        worker_pool_specs=pools,
        base_output_directory=aip.GcsDestination(output_uri_prefix=config.base_output_dir),
    )
    if config.service_account:
        spec.service_account = config.service_account
    if config.network:
        spec.network = config.network
    if config.timeout_hours:
        spec.scheduling = aip.Scheduling(timeout=f"{round(config.timeout_hours * 3600)}s")
    name = config.display_name or time.strftime("imagebeam-train-%Y%m%d-%H%M%S", time.gmtime())
    return aip.CustomJob(display_name=name, job_spec=spec, labels=dict(config.labels))


def job_json(job: aip.CustomJob) -> str:
    """The request body as JSON (camelCase fields, enum names)."""
    return aip.CustomJob.to_json(job, use_integers_for_enums=False, indent=2, sort_keys=True,
                               always_print_fields_with_no_presence=False)


def parse_job_json(text: str) -> aip.CustomJob:
    """A CustomJob back from `job_json`'s text; raises on an unknown field or enum value."""
    return aip.CustomJob.from_json(text, ignore_unknown_fields=False)


def job_client(region: str) -> aip.JobServiceClient:
    """A JobServiceClient on the region's endpoint, with Application Default Credentials."""
    return aip.JobServiceClient(
        client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})


def submit(job: aip.CustomJob, project: str, region: str,
           client: aip.JobServiceClient | None = None) -> aip.CustomJob:
    """Creates the job; returns it as Vertex AI holds it (with its resource `name`)."""
    client = client or job_client(region)
    return client.create_custom_job(parent=f"projects/{project}/locations/{region}",
                                    custom_job=job)


def wait(name: str, client: aip.JobServiceClient, poll_s: float = 30.0,
         echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
         sleep: Callable[[float], None] = time.sleep) -> aip.JobState:
    """Polls the job until it ends, echoing each state change; returns the final state."""
    last = None
    while True:
        job = client.get_custom_job(name=name)
        if job.state != last:
            last = job.state
            echo(f"[vertex] {name}: {job.state.name}")
        if job.state in _TERMINAL:
            if job.error.message:
                echo(f"[vertex] error: {job.error.message}")
            return job.state
        sleep(poll_s)


def describe(job: aip.CustomJob) -> str:
    """One line on what will run: machine, accelerator, image."""
    pools = job.job_spec.worker_pool_specs
    machine = pools[0].machine_spec
    gpu = (f" + {machine.accelerator_count} x {machine.accelerator_type.name}"
           if machine.accelerator_count else "")
    replicas = sum(p.replica_count for p in pools)
    count = f"{replicas} x " if replicas > 1 else ""
    return f"{count}{machine.machine_type}{gpu}, image {pools[0].container_spec.image_uri}"


def as_dict(job: aip.CustomJob) -> dict:
    return json.loads(job_json(job))

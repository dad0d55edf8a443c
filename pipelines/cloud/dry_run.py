"""`--dry_run`: what a command would do, told without touching Google Cloud.

`pipelines.run`, `pipelines.preprocess` and `pipelines.retrain` print these lines on stderr
(the Vertex AI CustomJob body goes to stdout, as JSON) and exit 0. Nothing here lists a
bucket, reads an object, builds a wheel or calls an API: what only Google Cloud can answer
is listed as "checked at run time", and `--check` answers it now (`online_checks`), for a
user with credentials.

The cost is a rough estimate at list prices, computed from the input's size where that is
known without the cloud (a local input, or a gs:// one listed by --check); `rough_cost`
says how. The assumptions behind its constants: docs/cloud.md#what-it-costs-roughly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    WorkerOptions,
)

from pipelines.cloud import access, dataflow
from pipelines.preprocessing.options import PreprocessConfig

if TYPE_CHECKING:  # vertex imports google.cloud.aiplatform_v1: seconds every local run paid
    from pipelines.cloud.vertex import VertexConfig

# Dataflow batch list prices (us-central1) and the throughput the estimate assumes.
DATAFLOW_USD_PER_VCPU_HOUR = 0.056
DATAFLOW_USD_PER_GB_HOUR = 0.003557
INPUT_MB_PER_VCPU_SECOND = 5.0  # decode-bound: JPEG bytes decoded, resized, re-encoded
STARTUP_HOURS_PER_JOB = 0.1  # worker VMs booting and installing before the first image
DEFAULT_DATAFLOW_MACHINE = "n1-standard-1"  # Dataflow's batch default
GCS_USD_PER_GB_MONTH = 0.02
# Vertex AI training, per machine-hour with its accelerators (list prices, us-central1).
VERTEX_USD_PER_HOUR: dict[tuple[str, str, int], float] = {
    ("g2-standard-8", "NVIDIA_L4", 1): 1.0,
    ("n1-standard-8", "NVIDIA_TESLA_T4", 1): 0.85,
    ("a2-highgpu-1g", "NVIDIA_TESLA_A100", 1): 4.0,
}
_DEFAULT_IDENTITY = "the Compute Engine default service account"
# GB of memory per vCPU of the predefined machine shapes.
_MEMORY_PER_VCPU = {"standard": 4.0, "highmem": 8.0, "highcpu": 1.0}
_N1_MEMORY_PER_VCPU = {"standard": 3.75, "highmem": 6.5, "highcpu": 0.9}


@dataclasses.dataclass(frozen=True)
class InputSize:
    files: int
    bytes: int
    where: str  # how it was learnt: "listed here", "listed on GCS (--check)"


def local_input_size(config: PreprocessConfig) -> InputSize | None:
    """Files and bytes under a local --input (dot-files skipped, as the job does); None for
    gs:// or a labels CSV (its files are counted when the CSV is read, at run time)."""
    if config.labels_csv or not config.input or "://" in config.input:
        return None
    files = total = 0
    for folder, dirs, names in os.walk(config.input):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                files += 1
                total += os.path.getsize(os.path.join(folder, name))
    return InputSize(files, total, "listed here")


def listed_input_size(root: str) -> InputSize:
    """Files and bytes under a gs:// (or local) prefix: one listing call (--check only)."""
    from apache_beam.io.filesystems import FileSystems

    matches = FileSystems.match([root.rstrip("/") + "/**"])[0].metadata_list
    found = [m for m in matches
             if not any(p.startswith(".") for p in m.path[len(root):].split("/"))]
    return InputSize(len(found), sum(m.size_in_bytes for m in found), "listed on GCS (--check)")


def machine_shape(machine_type: str) -> tuple[int, float] | None:
    """(vCPUs, GB of memory) of a predefined machine type such as n2-standard-4; None for
    others (custom, shared-core)."""
    match = re.fullmatch(r"([a-z0-9]+)-(standard|highmem|highcpu)-(\d+)", machine_type)
    if not match:
        return None
    family, kind, vcpus = match.group(1), match.group(2), int(match.group(3))
    per_vcpu = (_N1_MEMORY_PER_VCPU if family == "n1" else _MEMORY_PER_VCPU)[kind]
    return vcpus, vcpus * per_vcpu


def dataflow_cost(size: InputSize | None, machine_type: str) -> str:
    """One line: the rough price of preprocessing `size` on Dataflow (None: per GB of
    input), and how it is computed."""
    shape = machine_shape(machine_type)
    if shape is None:
        return f"Dataflow: {machine_type} is not a predefined shape; no estimate"
    vcpus, memory_gb = shape
    usd_per_hour = vcpus * DATAFLOW_USD_PER_VCPU_HOUR + memory_gb * DATAFLOW_USD_PER_GB_HOUR
    hours_per_gb = 1000 / (INPUT_MB_PER_VCPU_SECOND * vcpus * 3600)
    how = (f"at an assumed {INPUT_MB_PER_VCPU_SECOND:g} MB/s of input per vCPU, {vcpus} vCPU "
           f"{machine_type} workers at ${usd_per_hour:.3f}/h, + {STARTUP_HOURS_PER_JOB:g} "
           "worker-hours of start-up")
    if size is None:
        return (f"Dataflow: ~${hours_per_gb * usd_per_hour:.3f} per GB of input + "
                f"${STARTUP_HOURS_PER_JOB * usd_per_hour:.3f} a job ({how}); the input's size "
                "is known only by listing it (--check)")
    gigabytes = size.bytes / 1e9
    worker_hours = gigabytes * hours_per_gb + STARTUP_HOURS_PER_JOB
    return (f"Dataflow: ~${worker_hours * usd_per_hour:.2f} for {size.files} files, "
            f"{gigabytes * 1000:.1f} MB ({size.where}): {worker_hours:.2f} worker-hours {how}")


def vertex_cost(config: VertexConfig) -> str:
    """One line: Vertex AI's hourly price for this job's machines (hours are not estimated:
    they depend on the model, the epochs and the GPU)."""
    key = (config.machine_type, config.accelerator_type.upper(), config.accelerator_count)
    per_hour = VERTEX_USD_PER_HOUR.get(key)
    what = (f"{config.replica_count} x " if config.replica_count > 1 else "") + (
        f"{config.machine_type} + {config.accelerator_count} x {config.accelerator_type}")
    if per_hour is None:
        return f"Vertex AI: {what}: not in this table; see the Vertex AI pricing page"
    return (f"Vertex AI: ~${per_hour * config.replica_count:.2f} per hour of training for "
            f"{what} (how many hours depends on the model and --epochs: not estimated)")


def cost_lines(size: InputSize | None, options: PipelineOptions,
               vertex: VertexConfig | None) -> list[str]:
    """The rough cost: list prices, assumptions named; empty if nothing is billed."""
    lines = []
    if dataflow.is_dataflow(options):
        machine = options.view_as(WorkerOptions).machine_type or DEFAULT_DATAFLOW_MACHINE
        lines.append(dataflow_cost(size, machine))
    if vertex is not None:
        lines.append(vertex_cost(vertex))
    if lines:
        lines.append(f"Cloud Storage: ${GCS_USD_PER_GB_MONTH}/GB-month for what is written")
        return ["rough cost (list prices; an estimate, not a quote):",
                *[f"  {line}" for line in lines]]
    return []


def dataflow_lines(options: PipelineOptions, environ: Mapping[str, str] | None = None
                   ) -> list[str]:
    """The Dataflow job's settings and how its workers get the code; empty for other runners."""
    if not dataflow.is_dataflow(options):
        return []
    environ = os.environ if environ is None else environ
    gcp = options.view_as(GoogleCloudOptions)
    worker = options.view_as(WorkerOptions)
    workers = (f"{worker.num_workers or 'autoscaled from 1'} worker(s), at most "
               f"{worker.max_num_workers or 'Dataflow default'}")
    network = ", ".join(f"{flag} {value}" for flag, value in (
        ("--network", worker.network), ("--subnetwork", worker.subnetwork)) if value)
    return [
        f"Dataflow job in {gcp.project}/{gcp.region}: "
        f"{gcp.job_name or 'named imagebeam-preprocess-<UTC time> at submission'}"
        + (f"; classic template written to {gcp.template_location}"
           if dataflow.is_classic_template(options, environ) else ""),
        f"  temp {gcp.temp_location}, staging {gcp.staging_location or gcp.temp_location}",
        f"  workers: {worker.machine_type or DEFAULT_DATAFLOW_MACHINE + ' (default)'}, "
        f"{workers}; identity {gcp.service_account_email or _DEFAULT_IDENTITY}"
        + (f"; {network}" if network else "")
        + ("; no public IPs" if worker.use_public_ips is False else ""),
        f"  worker setup: {dataflow.worker_setup(options, environ)}",
    ]


def preprocess_cloud_use(config: PreprocessConfig, options: PipelineOptions,
                         *more_paths: str | None) -> access.CloudUse:
    """What a preprocess run (and `more_paths`, e.g. run's model/) uses on Google Cloud."""
    from pipelines.preprocessing.output import input_paths

    return access.cloud_use([*input_paths(config).values(), config.output, *more_paths],
                            dataflow_endpoint=access.dataflow_endpoint(options))


def preprocess_lines(config: PreprocessConfig, options: PipelineOptions,
                     size: InputSize | None = None) -> list[str]:
    """What the preprocess step reads (with its size where known) and writes."""
    reads = [f"{flag} {value}" for flag, value in (
        ("--input", config.input), ("--labels", config.labels_csv),
        ("--reuse_from", config.reuse_from), ("--baseline_stats", config.baseline_stats))
        if value]
    where = ("as a Dataflow job" if dataflow.is_dataflow(options) else "here, with "
             f"{options.view_as(dataflow.StandardOptions).runner}")
    return [
        f"preprocess {where}",
        f"  reads: {'; '.join(reads)}" + (f" ({size.files} files, {size.bytes / 1e6:.1f} MB, "
                                           f"{size.where})" if size else ""),
        f"  writes: {config.output}/ (its _IN_PROGRESS claim first; data/, errors/, index/, "
        "stats/, transform_output/; manifest.json last)",
    ]


RUN_TIME_CHECKS = (
    "where Google Cloud is used: credentials, and that its endpoints answer",
    "what --output holds: nothing, an earlier output of ours (reused, or replaced with "
    "--overwrite) or anything else (refused)",
    "that the input exists and holds images",
)
DATAFLOW_RUN_TIME_CHECKS = (
    "that the Dataflow API is enabled and the job's service account may run it (only "
    "Dataflow can tell; not checked by --check either)",
)


def run_time_lines(options: PipelineOptions, *extra: str) -> list[str]:
    """The online checks a dry run leaves to the run (or to --check)."""
    checks = [*RUN_TIME_CHECKS, *extra,
              *(DATAFLOW_RUN_TIME_CHECKS if dataflow.is_dataflow(options) else ())]
    return ["checked at run time (--dry_run --check checks them now, with credentials):",
            *[f"  {check}" for check in checks]]


def opening(config: PreprocessConfig, use: access.CloudUse, output: str, check: bool
            ) -> tuple[list[str], InputSize | None]:
    """The plan's first lines and the input's size where known: counted here for a local
    input; with `check`, the online checks' lines and a gs:// input's size from GCS."""
    lines = ["dry run: nothing runs" + ("" if check else "; Google Cloud is not contacted")]
    size = local_input_size(config)
    if check:
        gcs_input = config.input if (config.input or "").startswith("gs://") else None
        checked, listed = online_checks(use, gcs_input, output)
        lines += checked
        size = size or listed
    return lines, size


def online_checks(use: access.CloudUse, input_root: str | None, output: str,
                  environ: Mapping[str, str] | None = None) -> tuple[list[str], InputSize | None]:
    """--check: credentials, endpoints, the input's size and what the output holds; raises
    CloudAccessError or InputError. Returns (lines to print, input size or None)."""
    from pipelines.contract import ownership
    from pipelines.preprocessing.sources import InputError

    lines = []
    if use.any:
        kind = access.preflight(use, environ)
        lines.append(f"checked: credentials {kind or 'not needed (emulator)'}; "
                     "every endpoint answers")
    size = None
    if input_root:
        try:
            size = listed_input_size(input_root)
        except Exception as err:  # noqa: BLE001 - storage clients raise many kinds
            raise InputError(f"cannot list {input_root}: {str(err).splitlines()[0]}") from None
        if not size.files:
            raise InputError(f"no files found under {input_root}")
        lines.append(f"checked: {input_root} holds {size.files} files, {size.bytes / 1e6:.1f} MB")
    entries = ownership.list_entries(output)
    state = ("does not exist or is empty" if not entries else
             "holds a complete output (manifest.json)" if ownership.MANIFEST in entries else
             f"holds {len(entries)} entries: {', '.join(sorted(entries)[:5])}")
    lines.append(f"checked: {output} {state}")
    return lines, size

"""A trained SavedModel into service on a Vertex AI endpoint.

Three requests, built here from `google.cloud.aiplatform_v1` types by pure functions:

    UploadModelRequest     the SavedModel folder (gs://) into the Model Registry, served by
                           Google's prebuilt TensorFlow prediction container
    CreateEndpointRequest  only when no endpoint has the given display name
    DeployModelRequest     the uploaded model onto the endpoint; the new model takes
                           `traffic` percent and the models already deployed there share the
                           rest in their current proportions (a canary), or 100 percent on
                           an endpoint that serves nothing yet

`check_plan` validates them offline (a strict JSON round trip of each request, and the
rules Vertex would refuse that can be told here), as `vertex.build_custom_job` does for
the training job; `deploy` is the thin edge that reads the endpoint and sends them.
Identity: Application Default Credentials; no key is passed anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Mapping

from google.cloud import aiplatform_v1 as aip

from pipelines.cloud import vertex as vertex_lib
from pipelines.cloud.vertex import SpecError

# The newest TensorFlow of Vertex AI's prebuilt prediction containers ("tf2-cpu.2-15").
# A model saved by a newer TensorFlow may use ops the older server lacks: `check_saved_by`
# warns, and --serving_image picks another container.
PREBUILT_TF = (2, 15)
PREBUILT_REPOSITORY = ("{area}-docker.pkg.dev/vertex-ai/prediction/"
                       "tf2-{device}.{major}-{minor}:latest")
DEFAULT_MACHINE_TYPE = "n1-standard-4"
# The uploaded model's resource name is not known before the endpoint exists; the dry run
# prints this in its place.
CREATED_ENDPOINT = "<the endpoint CreateEndpointRequest creates>"
# The key Vertex reads as "the model this request deploys" in a traffic split.
THIS_MODEL = "0"
OPERATION_TIMEOUT_S = 3600  # deploying provisions machines: many minutes is normal
_MODEL_ID = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_ENDPOINT_NAME = re.compile(r"projects/([^/]+)/locations/([^/]+)/endpoints/([^/]+)")


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """What is deployed where, fixed before any request is built."""

    project: str
    region: str
    artifact_uri: str  # the SavedModel folder, gs://
    endpoint: str  # a display name, an endpoint ID, or projects/P/locations/R/endpoints/ID
    model_id: str  # the Model Registry ID of the upload: [a-z][a-z0-9_-]{0,62}
    traffic: int = 100  # percent for the new model (a canary: less than 100)
    machine_type: str = DEFAULT_MACHINE_TYPE
    accelerator_type: str = "none"  # an aiplatform_v1.AcceleratorType name, or none
    accelerator_count: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    serving_image: str | None = None  # default: `prebuilt_image` for the region and device
    labels: tuple[tuple[str, str], ...] = (("app", "imagebeam"),)

    @property
    def image(self) -> str:
        gpu = self.accelerator_type.lower() != "none"
        return self.serving_image or prebuilt_image(self.region, gpu)

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"


@dataclasses.dataclass(frozen=True)
class DeployPlan:
    """The requests `deploy` sends, in order (`create_endpoint` None: the endpoint exists)."""

    upload: aip.UploadModelRequest
    create_endpoint: aip.CreateEndpointRequest | None
    deploy: aip.DeployModelRequest
    # The split covers every model on the endpoint (False: a dry run that could not read
    # the endpoint; the models there share what the new one leaves).
    split_complete: bool = True

    def to_json(self) -> dict:
        """{request type name: its JSON body (camelCase, enum names)}, in sending order."""
        requests = [self.upload, self.create_endpoint, self.deploy]
        return {type(r).__name__: request_dict(r) for r in requests if r is not None}


@dataclasses.dataclass(frozen=True)
class DeployResult:
    """What a deployment created: the ids a retraining record keeps."""

    model: str  # projects/N/locations/R/models/ID
    model_version_id: str
    endpoint: str  # projects/N/locations/R/endpoints/ID
    endpoint_created: bool
    deployed_model_id: str
    traffic_split: dict[str, int]  # deployed model id -> percent, after the deployment

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- pure parts


def prebuilt_image(region: str, gpu: bool = False) -> str:
    """Google's prebuilt TensorFlow prediction image for `region`: from the Artifact
    Registry area (us, europe, asia) nearest to it, as the Cloud console picks it."""
    area = ("europe" if region.startswith(("europe-", "me-", "africa-"))
            else "asia" if region.startswith(("asia-", "australia-")) else "us")
    major, minor = PREBUILT_TF
    return PREBUILT_REPOSITORY.format(area=area, device="gpu" if gpu else "cpu",
                                      major=major, minor=minor)


def model_id_for(stamp: str) -> str:
    """A Model Registry ID from a run id or a time stamp: imagebeam-<stamp>, lowercase,
    other characters as '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", f"imagebeam-{stamp}".lower())[:63]


def endpoint_resource(config: DeployConfig) -> str | None:
    """The endpoint's resource name when `config.endpoint` is an ID or a resource name;
    None when it is a display name (found by that name, or created). Raises SpecError."""
    if re.fullmatch(r"[1-9][0-9]{0,18}", config.endpoint):
        return f"{config.parent}/endpoints/{config.endpoint}"
    found = _ENDPOINT_NAME.fullmatch(config.endpoint)
    if found:
        if found.group(2) != config.region:
            raise SpecError(f"endpoint {config.endpoint} is in {found.group(2)}, not "
                            f"--region {config.region}")
        return config.endpoint
    if "/" in config.endpoint or not 0 < len(config.endpoint) <= 128:
        raise SpecError(f"--endpoint {config.endpoint!r}: a display name (at most 128 "
                        "characters, no '/'), an endpoint ID or "
                        "projects/P/locations/R/endpoints/ID")
    return None


def traffic_split(percent: int, current: Mapping[str, int] | None) -> dict[str, int]:
    """The endpoint's split once the new model (key THIS_MODEL) takes `percent`: the
    models deployed now (`current`: deployed model id -> percent) share the rest in
    their current proportions, rounded by largest remainder so the split sums to 100.
    An endpoint with no traffic yet gives the new model 100. `current` None (unknown):
    only the new model's share."""
    if current is None:
        return {THIS_MODEL: percent}
    live = {key: share for key, share in current.items() if share > 0}
    if not live:
        return {THIS_MODEL: 100, **{key: 0 for key in current}}
    rest, total = 100 - percent, sum(live.values())
    exact = {key: rest * share / total for key, share in live.items()}
    split = {key: int(value) for key, value in exact.items()}
    left = rest - sum(split.values())
    for key in sorted(exact, key=lambda k: (split[k] - exact[k], k))[:left]:
        split[key] += 1
    return {THIS_MODEL: percent, **{key: split.get(key, 0) for key in current}}


def upload_request(config: DeployConfig) -> aip.UploadModelRequest:
    return aip.UploadModelRequest(
        parent=config.parent,
        model_id=config.model_id,
        model=aip.Model(
            display_name=config.model_id,
            artifact_uri=config.artifact_uri,
            container_spec=aip.ModelContainerSpec(image_uri=config.image),
            labels=dict(config.labels),
        ),
    )


def create_endpoint_request(config: DeployConfig) -> aip.CreateEndpointRequest:
    return aip.CreateEndpointRequest(
        parent=config.parent,
        endpoint=aip.Endpoint(display_name=config.endpoint, labels=dict(config.labels)))


def deploy_request(config: DeployConfig, model: str, endpoint: str,
                   current: Mapping[str, int] | None) -> aip.DeployModelRequest:
    """`model` onto `endpoint` (resource names) on dedicated machines; `current` as in
    `traffic_split`."""
    machine = aip.MachineSpec(machine_type=config.machine_type)
    if config.accelerator_type.lower() != "none":
        machine.accelerator_type = vertex_lib.accelerator(config.accelerator_type)
        machine.accelerator_count = config.accelerator_count
    return aip.DeployModelRequest(
        endpoint=endpoint,
        deployed_model=aip.DeployedModel(
            model=model,
            display_name=config.model_id,
            dedicated_resources=aip.DedicatedResources(
                machine_spec=machine, min_replica_count=config.min_replicas,
                max_replica_count=config.max_replicas)),
        traffic_split=traffic_split(config.traffic, current),
    )


def build_plan(config: DeployConfig, endpoint: aip.Endpoint | None,
               known: bool = True) -> DeployPlan:
    """The requests for `config`. `endpoint`: the existing endpoint (its traffic split is
    shared with the new model), or None to create one. `known` False: the endpoint was
    not read (a dry run), so its split is unknown. Raises SpecError (see `check_plan`)."""
    model = f"{config.parent}/models/{config.model_id}"
    if endpoint is None:
        plan = DeployPlan(upload_request(config), create_endpoint_request(config),
                          deploy_request(config, model, CREATED_ENDPOINT, {}))
    else:
        current = dict(endpoint.traffic_split) if known else None
        plan = DeployPlan(upload_request(config), None,
                          deploy_request(config, model, endpoint.name, current),
                          split_complete=known)
    check_plan(config, plan)
    return plan


def check_plan(config: DeployConfig, plan: DeployPlan) -> None:
    """Raises SpecError for what Vertex would refuse and can be told offline: a model not
    on gs://, a bad model ID or image URI, a machine that cannot carry the accelerator,
    replica counts, a split that is not whole percentages summing to 100, or a request
    that does not survive a strict JSON round trip of its aiplatform_v1 type."""
    if not config.artifact_uri.startswith("gs://"):
        raise SpecError(f"Vertex AI reads models from gs:// only, got {config.artifact_uri!r}")
    if not _MODEL_ID.fullmatch(config.model_id):
        raise SpecError(f"model ID {config.model_id!r}: [a-z][a-z0-9_-], at most 63")
    if not re.fullmatch(r"[^\s/]+(/[^\s/]+)*(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})?",
                        config.image):
        raise SpecError(f"not a container image URI: {config.image!r}")
    vertex_lib.check_machine(config.machine_type, config.accelerator_type,
                             config.accelerator_count)
    if not 1 <= config.min_replicas <= config.max_replicas:
        raise SpecError("replicas: need 1 <= min <= max, got "
                        f"{config.min_replicas}..{config.max_replicas}")
    if not 0 <= config.traffic <= 100:
        raise SpecError(f"--traffic {config.traffic}: a percentage, 0 to 100")
    split = dict(plan.deploy.traffic_split)
    if plan.split_complete and sum(split.values()) != 100:
        raise SpecError(f"traffic split {split} does not sum to 100")
    for request in (plan.upload, plan.create_endpoint, plan.deploy):
        if request is not None and parse_request(type(request), request_json(request)) != request:
            raise SpecError(f"{type(request).__name__} does not round-trip through JSON")


def request_json(request) -> str:
    """A request as its JSON body (camelCase fields, enum names)."""
    return type(request).to_json(request, use_integers_for_enums=False, indent=2,
                                 sort_keys=True, always_print_fields_with_no_presence=False)


def request_dict(request) -> dict:
    return json.loads(request_json(request))


def parse_request(kind: type, text: str):
    """A request of type `kind` back from its JSON; raises on an unknown field or enum."""
    return kind.from_json(text, ignore_unknown_fields=False)


def saved_by_newer_tensorflow(version: str | None) -> bool:
    """Whether TensorFlow `version` ('2.21.0') is newer than the prebuilt server's."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return bool(found) and (int(found.group(1)), int(found.group(2))) > PREBUILT_TF


# ---------------------------------------------------------------- flags


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                  prefix: str = "") -> None:
    """The deployment's machine and traffic flags; `prefix` names them for a command that
    has other flags (retrain: --deploy_traffic, ...)."""
    parser.add_argument(f"--{prefix}traffic", type=int, default=100, metavar="PERCENT",
                        help="the new model's share of the endpoint's traffic; the models "
                        "there share the rest as now (a canary: less than 100; default 100)")
    parser.add_argument(f"--{prefix}machine_type", default=DEFAULT_MACHINE_TYPE,
                        help=f"serving machine (default {DEFAULT_MACHINE_TYPE})")
    parser.add_argument(f"--{prefix}accelerator_type", default="none",
                        help="an AcceleratorType name (e.g. NVIDIA_TESLA_T4) or none (default)")
    parser.add_argument(f"--{prefix}accelerator_count", type=int, default=1)
    parser.add_argument(f"--{prefix}min_replicas", type=int, default=1)
    parser.add_argument(f"--{prefix}max_replicas", type=int, default=1,
                        help="more than min: Vertex scales on CPU/GPU load")
    parser.add_argument(f"--{prefix}serving_image", metavar="URI",
                        help="serving container (default: Google's prebuilt TensorFlow "
                        f"{PREBUILT_TF[0]}.{PREBUILT_TF[1]} image, CPU or GPU, nearest the "
                        "region)")


def config_from_args(args: argparse.Namespace, *, prefix: str = "", project: str | None,
                     region: str | None, endpoint: str, artifact_uri: str,
                     model_id: str) -> DeployConfig:
    """The DeployConfig the flags of `add_arguments` describe, checked by building its
    requests now. Raises SpecError with a one-line message."""
    missing = [flag for flag, value in (("--project", project), ("--region", region))
               if not value]
    if missing:
        raise SpecError(f"deploying to Vertex AI needs {' and '.join(missing)}")

    def flag(name):
        return getattr(args, prefix + name)

    config = DeployConfig(
        project=project, region=region, artifact_uri=artifact_uri, endpoint=endpoint,
        model_id=model_id, traffic=flag("traffic"), machine_type=flag("machine_type"),
        accelerator_type=flag("accelerator_type"),
        accelerator_count=flag("accelerator_count"), min_replicas=flag("min_replicas"),
        max_replicas=flag("max_replicas"), serving_image=flag("serving_image"))
    dry_run_plan(config)
    return config


def dry_run_plan(config: DeployConfig) -> DeployPlan:
    """The plan without reading Vertex AI: an endpoint given by name is assumed new, one
    given by ID exists with an unknown split. Raises SpecError."""
    name = endpoint_resource(config)
    existing = aip.Endpoint(name=name) if name else None
    return build_plan(config, existing, known=existing is None)


# ---------------------------------------------------------------- the edge


def _client_options(region: str) -> dict:
    return {"api_endpoint": f"{region}-aiplatform.googleapis.com"}


def find_endpoint(client: aip.EndpointServiceClient, config: DeployConfig) -> aip.Endpoint | None:
    """The endpoint `config.endpoint` names, or None if no endpoint has that display name.
    Raises SpecError when several do (give its ID)."""
    name = endpoint_resource(config)
    if name:
        return client.get_endpoint(name=name)
    quoted = config.endpoint.replace("\\", "\\\\").replace('"', '\\"')
    found = list(client.list_endpoints(request=aip.ListEndpointsRequest(
        parent=config.parent, filter=f'display_name="{quoted}"')))
    if len(found) > 1:
        raise SpecError(f"{len(found)} endpoints are named {config.endpoint!r} in "
                        f"{config.region}: give the endpoint ID")
    return found[0] if found else None


def deploy(config: DeployConfig,
           echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
           ) -> DeployResult:
    """Uploads, creates the endpoint if needed, deploys; waits for each operation.
    A failure after the upload leaves the uploaded model (and a created endpoint) in
    place, unused; the error says what exists."""
    endpoints = aip.EndpointServiceClient(client_options=_client_options(config.region))
    models = aip.ModelServiceClient(client_options=_client_options(config.region))
    endpoint = find_endpoint(endpoints, config)
    plan = build_plan(config, endpoint)
    started = time.monotonic()
    uploaded = models.upload_model(request=plan.upload).result(timeout=OPERATION_TIMEOUT_S)
    echo(f"[deploy] uploaded {uploaded.model} (version {uploaded.model_version_id}, "
         f"{config.image})")
    request = plan.deploy
    request.deployed_model.model = uploaded.model
    if plan.create_endpoint is not None:
        endpoint = endpoints.create_endpoint(request=plan.create_endpoint).result(
            timeout=OPERATION_TIMEOUT_S)
        echo(f"[deploy] created endpoint {endpoint.name} ({config.endpoint})")
        request.endpoint = endpoint.name
    echo(f"[deploy] deploying to {request.endpoint}, traffic {dict(request.traffic_split)} "
         "(provisioning takes minutes)")
    deployed = endpoints.deploy_model(request=request).result(timeout=OPERATION_TIMEOUT_S)
    deployed_id = deployed.deployed_model.id
    split = {deployed_id if key == THIS_MODEL else key: share
             for key, share in request.traffic_split.items()}
    echo(f"[deploy] deployed model {deployed_id} in {time.monotonic() - started:.0f}s")
    return DeployResult(model=uploaded.model, model_version_id=uploaded.model_version_id,
                        endpoint=request.endpoint,
                        endpoint_created=plan.create_endpoint is not None,
                        deployed_model_id=deployed_id, traffic_split=split)

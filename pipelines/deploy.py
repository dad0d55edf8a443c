"""A trained SavedModel onto a Vertex AI endpoint (online prediction).

    python -m pipelines.deploy --model gs://b/model/saved_model --endpoint imagebeam \
        --project P --region us-central1 [--traffic 10] [--dry_run]
    python -m pipelines.deploy --model gs://b/retrain/current.json --endpoint 1234567890 ...

Uploads the model to the Model Registry with Google's prebuilt TensorFlow serving
container, creates the endpoint if no endpoint has that display name, and deploys with
the new model on `--traffic` percent. `--dry_run` prints the requests (checked offline)
and calls nothing. See docs/prediction.md; the requests are `pipelines.cloud.deploy`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from google.api_core import exceptions as google_errors

from pipelines.cloud import access
from pipelines.cloud import deploy as deploy_lib
from pipelines.contract.command import prog
from pipelines.contract.errors import UsageError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pipelines.deploy"), allow_abbrev=False,
        description="Upload a SavedModel to the Vertex AI Model Registry and deploy it to "
        "an endpoint (created when none has the name), with a traffic split for a canary.")
    parser.add_argument("--model", required=True,
                        help="gs:// SavedModel folder, or a retraining root's current.json")
    parser.add_argument("--endpoint", required=True, metavar="NAME|ID",
                        help="endpoint display name (created if none has it), endpoint ID, "
                        "or projects/P/locations/R/endpoints/ID")
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True, help="Vertex AI region, e.g. us-central1")
    parser.add_argument("--model_id", help="Model Registry ID of the upload (default "
                        "imagebeam-<UTC time>)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the requests (aiplatform_v1 JSON bodies), call nothing")
    deploy_lib.add_arguments(parser)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[deploy_lib.DeployConfig, bool]:
    """(the checked config, dry run?). Checks the credentials (and, unless a dry run,
    that Vertex AI answers), reads the model pointer; raises UsageError."""
    from pipelines.prediction.model import resolve_model

    args = _parser().parse_args(list(argv))
    if not args.model.startswith("gs://"):
        raise UsageError(f"--model {args.model}: Vertex AI reads models from gs:// only")
    # Before the first read: the storage client retries a missing credential for minutes.
    access.preflight(access.cloud_use([args.model],
                                      vertex_region=None if args.dry_run else args.region))
    saved_model = resolve_model(args.model.rstrip("/"))
    model_id = args.model_id or deploy_lib.model_id_for(
        time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    try:
        config = deploy_lib.config_from_args(
            args, project=args.project, region=args.region, endpoint=args.endpoint,
            artifact_uri=saved_model, model_id=model_id)
    except deploy_lib.SpecError as err:
        raise UsageError(str(err)) from err
    return config, args.dry_run


def warn_if_newer_than_the_server(saved_model: str) -> None:
    """One line when the model was saved by a TensorFlow newer than the prebuilt server:
    it may use ops that server cannot load, which only a test deployment shows."""
    from pipelines.prediction.model import saved_by

    version = saved_by(saved_model)
    if deploy_lib.saved_by_newer_tensorflow(version):
        major, minor = deploy_lib.PREBUILT_TF
        print(f"[deploy] warning: the model was saved by TensorFlow {version}; the prebuilt "
              f"server is TensorFlow {major}.{minor} and may not load every op of it: try it "
              "with --traffic 0 or a test endpoint first, or pass --serving_image",
              file=sys.stderr)


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 deployed (or, with --dry_run, the requests printed),
    1 a Vertex AI call failed, 2 usage error (nothing was sent)."""
    try:
        config, dry_run = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.serving_image is None:
        warn_if_newer_than_the_server(config.artifact_uri)
    if dry_run:
        plan = deploy_lib.dry_run_plan(config)
        print(json.dumps(plan.to_json(), indent=2))
        if plan.create_endpoint is not None:
            print(f"[deploy] CreateEndpointRequest goes only if no endpoint in "
                  f"{config.region} is named {config.endpoint!r}; if one is, the model joins "
                  f"it with {config.traffic}% of its traffic (a dry run does not look)",
                  file=sys.stderr)
        if not plan.split_complete:
            print(f"[deploy] the models on {config.endpoint} will share the other "
                  f"{100 - config.traffic}% as they share its traffic now (read when "
                  "deploying; a dry run calls nothing)", file=sys.stderr)
        return 0
    try:
        result = deploy_lib.deploy(config)
    except deploy_lib.SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (google_errors.GoogleAPICallError, TimeoutError) as err:
        print(f"error: Vertex AI: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=2))
    return 0


def main() -> int:
    """`python -m pipelines.deploy` and `imagebeam deploy`: the exit code of `run`."""
    return run()


if __name__ == "__main__":
    sys.exit(main())

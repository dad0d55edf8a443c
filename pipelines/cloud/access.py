"""Before a command touches Google Cloud: are there credentials, can its endpoints be reached?

Every command that reads or writes gs://, submits to Dataflow or creates a Vertex AI job
calls `preflight` once, after its flags are checked and before Beam or a client library
starts: those retry a missing credential or an unreachable endpoint for minutes, logging a
traceback per attempt. Here each problem is one line (`CloudAccessError`, a UsageError:
`error: ...`, exit 2) within seconds:

- credentials: `google.auth.default()`, Application Default Credentials, found without any
  network call. The metadata server is asked only where one is expected (a Google Cloud VM by
  its SMBIOS name, Cloud Run, or GCE_METADATA_HOST set); elsewhere google-auth is handed a
  transport that answers "no metadata server" at once, instead of waiting on its timeouts and
  retries. A GCS emulator (STORAGE_EMULATOR_HOST) needs no credentials; Dataflow and Vertex AI
  always do.
- endpoints: one TCP connect per endpoint (GCS or its emulator, Dataflow unless only a
  template is written, the region's Vertex AI endpoint; through HTTPS_PROXY where one is set),
  all at once under one short deadline, name resolution included. Once these pass, errors
  during the run are Beam's and the clients', retried as they always were.

Nothing here prints or returns a token, a key or a credential file's contents: messages
name the file and what kind of credential it holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping

from pipelines.contract.errors import UsageError

# One deadline for all endpoint probes together, DNS included: long enough for a slow but
# working network (a TCP handshake, not a request), short enough to answer "no network" in
# seconds rather than after the clients' retries.
CONNECT_TIMEOUT_S = 5.0
GCS_ENDPOINT = "https://storage.googleapis.com"
DATAFLOW_ENDPOINT = "https://dataflow.googleapis.com"
LOGIN_HINT = ("run `gcloud auth application-default login`, or set "
              "GOOGLE_APPLICATION_CREDENTIALS to a service account's key file (on Google "
              "Cloud: attach a service account to the VM or job)")
_SMBIOS_PRODUCT = "/sys/class/dmi/id/product_name"


class CloudAccessError(UsageError):
    """No credentials, or an endpoint that cannot be reached; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class CloudUse:
    """What a command is about to use on Google Cloud."""

    gcs: bool = False  # reads or writes gs:// paths
    dataflow_endpoint: str | None = None  # submits a Dataflow job to this API endpoint
    vertex_region: str | None = None  # creates a Vertex AI job in this region

    @property
    def any(self) -> bool:
        return self.gcs or bool(self.dataflow_endpoint) or bool(self.vertex_region)

    def needs_credentials(self, environ: Mapping[str, str]) -> bool:
        """An emulator stands in for GCS only; Dataflow and Vertex AI are never emulated."""
        return (bool(self.dataflow_endpoint) or bool(self.vertex_region)
                or (self.gcs and not environ.get("STORAGE_EMULATOR_HOST")))

    def services(self, environ: Mapping[str, str]) -> str:
        """'gs:// paths, Dataflow and Vertex AI': what needs the credentials."""
        gcs = self.gcs and not environ.get("STORAGE_EMULATOR_HOST")
        names = [name for name, used in (("gs:// paths", gcs),
                                         ("Dataflow", self.dataflow_endpoint),
                                         ("Vertex AI", self.vertex_region)) if used]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def cloud_use(paths: Iterable[str | None], *, dataflow_endpoint: str | None = None,
              vertex_region: str | None = None) -> CloudUse:
    """CloudUse of a command given the paths it reads or writes (None entries ignored)."""
    return CloudUse(gcs=any(p and p.startswith("gs://") for p in paths),
                    dataflow_endpoint=dataflow_endpoint, vertex_region=vertex_region)


def dataflow_endpoint(options) -> str | None:
    """The Dataflow API endpoint a run with these Beam options calls, or None: other
    runners, and a template build (it writes the job to GCS and calls no Dataflow API)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from pipelines.cloud import dataflow

    gcp = options.view_as(GoogleCloudOptions)
    if not dataflow.is_dataflow(options) or gcp.template_location:
        return None
    return gcp.dataflow_endpoint or DATAFLOW_ENDPOINT


@dataclasses.dataclass(frozen=True)
class Endpoint:
    what: str  # for the message: "GCS", "the GCS emulator", "Dataflow", "Vertex AI"
    host: str
    port: int


def endpoints(use: CloudUse, environ: Mapping[str, str]) -> list[Endpoint]:
    """The hosts `use` connects to first: for https endpoints, the proxy when one is set."""
    found = []
    if use.gcs:
        emulator = environ.get("STORAGE_EMULATOR_HOST")
        found.append(_endpoint("the GCS emulator (STORAGE_EMULATOR_HOST)" if emulator else "GCS",
                               emulator or GCS_ENDPOINT, environ))
    if use.dataflow_endpoint:
        found.append(_endpoint("Dataflow", use.dataflow_endpoint, environ))
    if use.vertex_region:
        found.append(_endpoint("Vertex AI", f"https://{use.vertex_region}-aiplatform."
                               "googleapis.com", environ))
    return found


def _endpoint(what: str, url: str, environ: Mapping[str, str]) -> Endpoint:
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    if parsed.scheme == "https" and proxy and not _bypasses_proxy(host, environ):
        through = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return Endpoint(f"the proxy for {what} (HTTPS_PROXY)", through.hostname or "",
                        through.port or 80)
    return Endpoint(what, host, port)


def _bypasses_proxy(host: str, environ: Mapping[str, str]) -> bool:
    no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    suffixes = [s.strip().lstrip(".") for s in no_proxy.split(",") if s.strip()]
    return any(s == "*" or host == s or host.endswith("." + s) for s in suffixes)


def preflight(use: CloudUse, environ: Mapping[str, str] | None = None,
              timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Raises CloudAccessError unless credentials exist (where needed) and every endpoint
    answers; returns what the credentials are (None: none needed), for a plan to show."""
    environ = os.environ if environ is None else environ
    if not use.any:
        return None
    kind = check_credentials(use) if use.needs_credentials(environ) else None
    check_endpoints(endpoints(use, environ), timeout_s)
    return kind


def check_credentials(use: CloudUse) -> str:
    """Application Default Credentials, found with no network call; returns what kind they
    are ("a service account key file", ...). Raises CloudAccessError."""
    import google.auth
    import google.auth.exceptions

    # google.auth.default's own order. A file is loaded directly: for gcloud's file,
    # default() would also run `gcloud config config-helper` for a project id, and that
    # refreshes gcloud's token over the network.
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or _gcloud_adc_file()
    request = None if _metadata_server_expected(os.environ) else _NoMetadataServer()
    try:
        with _quiet("google.auth"):  # its lines about the metadata server: ours is one
            if path:
                credentials, _project = google.auth.load_credentials_from_file(path)
            else:
                credentials, _project = google.auth.default(request=request)
    except google.auth.exceptions.DefaultCredentialsError as err:
        raise CloudAccessError(_credentials_message(use, err)) from None
    return _kind(credentials)


def _gcloud_adc_file() -> str | None:
    """Where `gcloud auth application-default login` writes, if it did."""
    from google.auth import _cloud_sdk

    path = _cloud_sdk.get_application_default_credentials_path()
    return path if os.path.isfile(path) else None


def _credentials_message(use: CloudUse, err: Exception) -> str:
    explicit = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        # google-auth's first argument names the file and what is wrong with it; the
        # parser's error it may carry as a second one is left out, and so is all but the
        # first line.
        first = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        reason = first.strip().splitlines()[0] if first.strip() else type(err).__name__
        return (f"Google Cloud credentials are needed ({use.services(os.environ)}) and "
                f"GOOGLE_APPLICATION_CREDENTIALS={explicit} gives none: {reason}")
    return (f"Google Cloud credentials are needed ({use.services(os.environ)}) and none were found "
            f"(Application Default Credentials): {LOGIN_HINT}")


def _kind(credentials: object) -> str:
    """What the credentials are, without anything they hold."""
    module = type(credentials).__module__
    email = getattr(credentials, "service_account_email", None)
    if module.startswith("google.oauth2.service_account"):
        return f"service account key file ({email})"
    if module.startswith("google.auth.compute_engine"):
        return "the attached service account (metadata server)"
    if module.startswith("google.auth.impersonated_credentials"):
        return "impersonated service account"
    if module.startswith("google.oauth2.credentials"):
        return "user credentials (gcloud auth application-default login)"
    return type(credentials).__name__


def check_endpoints(found: Iterable[Endpoint], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connect to each endpoint, all at once; CloudAccessError naming the first that
    did not answer within `timeout_s` (name resolution included)."""
    found = list(found)
    results: dict[int, str | None] = {}

    def attempt(index: int, endpoint: Endpoint) -> None:
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s):
                results[index] = None
        except socket.gaierror:
            results[index] = f"its name {endpoint.host} does not resolve (DNS)"
        except ConnectionRefusedError:
            results[index] = f"{endpoint.host}:{endpoint.port} refused the connection"
        except OSError as err:  # timeouts, unreachable networks
            results[index] = f"{endpoint.host}:{endpoint.port}: {err.strerror or err}"

    threads = [threading.Thread(target=attempt, args=(i, e), daemon=True)
               for i, e in enumerate(found)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for index, endpoint in enumerate(found):
        reason = results.get(index, f"no answer from {endpoint.host}:{endpoint.port} "
                                    f"within {timeout_s:g}s")
        if reason is not None:
            raise CloudAccessError(f"cannot reach {endpoint.what}: {reason}; check the "
                                   "network, proxy or firewall and try again")


def _metadata_server_expected(environ: Mapping[str, str]) -> bool:
    """A metadata server answers here: a Google Cloud VM (GKE and Composer nodes too), Cloud
    Run, or one named explicitly."""
    if any(environ.get(name) for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP",
                                          "K_SERVICE", "CLOUD_RUN_JOB")):
        return True
    try:
        with open(_SMBIOS_PRODUCT, encoding="utf-8") as handle:
            return handle.read().strip().startswith("Google")
    except OSError:
        return False


class _NoMetadataServer:
    """A google.auth transport for machines without a metadata server: every request gets
    a 404 at once, which google-auth reads as "not on Google Cloud", with no retry."""

    class _Response:
        status = 404
        headers: dict[str, str] = {}
        data = b""

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        return self._Response()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)

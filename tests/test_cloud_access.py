"""The up-front cloud check (pipelines/cloud/access.py) and the dry run's cost arithmetic
(pipelines/cloud/dry_run.py), in-process: real google-auth, real sockets on loopback."""

from __future__ import annotations

import json
import socket
import time

import pytest

from pipelines.cloud import access, dry_run

FAKE_REFRESH_TOKEN = "1//0g-FAKE-REFRESH-TOKEN-imagebeam-test"
FAKE_CLIENT_SECRET = "FAKE-CLIENT-SECRET-imagebeam"
ALL = access.CloudUse(gcs=True, dataflow_endpoint="https://dataflow.googleapis.com",
                      vertex_region="us-central1")


def new_user_machine(tmp_path, monkeypatch):
    """HOME and gcloud's config in an empty folder (returned); no credential, emulator,
    proxy or metadata variable: a laptop before `gcloud auth application-default login`."""
    empty = tmp_path / "empty-home"
    empty.mkdir()
    monkeypatch.setenv("HOME", str(empty))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(empty))
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                 "STORAGE_EMULATOR_HOST", "HTTPS_PROXY", "https_proxy", "GCE_METADATA_HOST",
                 "GCE_METADATA_IP", "K_SERVICE", "CLOUD_RUN_JOB"):
        monkeypatch.delenv(name, raising=False)
    return empty


def refuse_network(monkeypatch) -> list:
    """Every connection attempt or name lookup from now on is recorded (the returned list)
    and refused."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    return new_user_machine(tmp_path, monkeypatch)


@pytest.fixture
def no_network(monkeypatch):
    return refuse_network(monkeypatch)


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_user_credentials(path) -> str:
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "fake.apps",
                                "client_secret": FAKE_CLIENT_SECRET,
                                "refresh_token": FAKE_REFRESH_TOKEN}))
    return str(path)


def test_no_credentials_is_one_line_saying_what_to_run_with_no_network_call(
        no_credentials, no_network):
    started = time.monotonic()
    with pytest.raises(access.CloudAccessError) as caught:
        access.preflight(ALL)
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "\n" not in message
    assert "gcloud auth application-default login" in message
    assert "(gs:// paths, Dataflow and Vertex AI)" in message
    assert no_network == []  # not even the metadata server was asked


def test_an_emulator_needs_no_credentials_but_dataflow_and_vertex_do(no_credentials,
                                                                     monkeypatch):
    with socket.socket() as server:  # stands in for the emulator's port: it answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert access.preflight(access.CloudUse(gcs=True)) is None
        with pytest.raises(access.CloudAccessError, match=r"needed \(Vertex AI\)"):
            access.preflight(access.CloudUse(gcs=True, vertex_region="us-central1"))


def test_credentials_found_say_what_they_are_and_nothing_they_hold(no_credentials, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       write_user_credentials(tmp_path / "adc.json"))
    kind = access.check_credentials(ALL)
    assert kind == "user credentials (gcloud auth application-default login)"
    # The same file where gcloud keeps it.
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    write_user_credentials(no_credentials / "application_default_credentials.json")
    assert access.check_credentials(ALL) == kind


def test_an_unusable_key_file_is_named_without_its_contents(no_credentials, tmp_path,
                                                            monkeypatch):
    key = tmp_path / "key.json"
    key.write_text(json.dumps({
        "type": "service_account", "client_email": "runner@p.iam.gserviceaccount.com",
        "private_key_id": "fake-key-id-0123456789",
        "private_key": "-----BEGIN PRIVATE KEY-----\nFAKEKEYMATERIALimagebeam\n"
                       "-----END PRIVATE KEY-----\n",
        "token_uri": "https://oauth2.googleapis.com/token"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    with pytest.raises(access.CloudAccessError) as caught:
        access.check_credentials(ALL)
    message = str(caught.value)
    assert f"GOOGLE_APPLICATION_CREDENTIALS={key} gives none" in message
    assert "Failed to load service account credentials" in message
    for secret in ("FAKEKEYMATERIAL", "fake-key-id", "BEGIN PRIVATE KEY"):
        assert secret not in message


def test_unreachable_endpoints_fail_fast_naming_the_endpoint():
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(access.CloudAccessError, match=f"127.0.0.1:{port} refused"):
        access.check_endpoints([access.Endpoint("Dataflow", "127.0.0.1", port)])
    with pytest.raises(access.CloudAccessError, match="does not resolve"):
        access.check_endpoints([access.Endpoint("GCS", "storage.imagebeam-test.invalid", 443)])
    assert time.monotonic() - started < 10
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        access.check_endpoints([access.Endpoint("x", "127.0.0.1", server.getsockname()[1])])


def test_endpoints_follow_the_emulator_the_dataflow_flag_and_the_proxy():
    use = access.CloudUse(gcs=True, dataflow_endpoint="http://127.0.0.1:9/",
                          vertex_region="europe-west4")
    assert access.endpoints(use, {}) == [
        access.Endpoint("GCS", "storage.googleapis.com", 443),
        access.Endpoint("Dataflow", "127.0.0.1", 9),
        access.Endpoint("Vertex AI", "europe-west4-aiplatform.googleapis.com", 443)]
    proxied = access.endpoints(use, {"HTTPS_PROXY": "http://proxy.corp:3128",
                                     "NO_PROXY": ".googleapis.com",
                                     "STORAGE_EMULATOR_HOST": "http://localhost:4443"})
    assert [(e.host, e.port) for e in proxied] == [
        ("localhost", 4443), ("127.0.0.1", 9), ("europe-west4-aiplatform.googleapis.com", 443)]
    through = access.endpoints(access.CloudUse(vertex_region="us-east1"),
                               {"https_proxy": "proxy.corp:3128"})
    assert through == [access.Endpoint("the proxy for Vertex AI (HTTPS_PROXY)", "proxy.corp",
                                       3128)]


def test_what_a_command_uses():
    assert not access.cloud_use(["/data/raw", None, "out/"]).any
    assert access.cloud_use(["/data/raw", "gs://b/out"]).gcs


def test_rough_dataflow_cost_is_the_stated_arithmetic():
    assert dry_run.machine_shape("n2-standard-4") == (4, 16.0)
    assert dry_run.machine_shape("n1-highmem-8") == (8, 52.0)
    assert dry_run.machine_shape("e2-custom-4-8192") is None
    size = dry_run.InputSize(files=30_000, bytes=9 * 10**9, where="listed here")
    line = dry_run.dataflow_cost(size, "n2-standard-4")
    # 9,000 MB / (5 MB/s x 4 vCPU) = 450 s = 0.125 h, + 0.1 h start-up = 0.225 worker-hours
    # at 4 x 0.056 + 16 x 0.003557 = 0.281 $/h -> $0.063
    assert "~$0.06 for 30000 files, 9000.0 MB" in line and "0.23 worker-hours" in line
    per_gb = dry_run.dataflow_cost(None, "n2-standard-4")
    assert per_gb.startswith("Dataflow: ~$0.004 per GB of input + $0.028 a job")

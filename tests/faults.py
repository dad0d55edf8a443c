"""Flaky storage for tests: a fault-injecting loopback proxy in front of the GCS emulator.

    plan = FaultPlan(rate=0.10, seed=7)
    with FlakyGcsEmulator(plan) as emulator:      # STORAGE_EMULATOR_HOST -> the faulty proxy
        emulator.create_bucket("b")                # setup runs fault-free ...
        with plan.active():                        # ... faults only inside this block
            preprocess.run([...])
        print(plan.injected)                       # Counter({'503': 41, 'reset': 12, ...})

What it injects, on a share `rate` of requests (loopback only, every fault bounded):
  503 / 429       answered at once, the request never reaches the server
  reset           the connection is reset before the request is forwarded
  reset_after     the request IS applied upstream, then the connection is reset: the
                  client cannot know it succeeded and must retry an operation that
                  already happened (the nasty case for copies, deletes and uploads)
  cut_body        the upstream answer's headers and half its body, then a reset
and, on a further share `delay_rate`, a delay of up to `max_delay_s` before forwarding.
`always` answers every request for chosen objects with a fixed status or a reset (a 403 for
good, a 503 that outlasts every retry), whatever the rate.

Determinism: whether the n-th attempt of a request is hit is a hash of (seed, request
key, n), not a shared random stream, so the decision does not depend on how threads and
worker processes interleave. The key drops volatile parts (uuids in temp names, upload
ids). At most `max_consecutive` attempts of one key fail in a row, so every request
succeeds within the client's retry budget and a correct client always finishes.

How it sits: the emulator's fake-gcs-server is started with this proxy's URL as its
external URL, so the links it hands out (resumable-upload sessions, media links) lead
back through the faults too, and the emulator's own proxy (batch Content-ID fix) sits
behind this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator

from tests.support import gcs_emulator
from tests.support.gcs_emulator import GcsEmulator

FAILURE_KINDS = ("503", "429", "reset", "reset_after", "cut_body")
_VOLATILE = re.compile(r"[0-9a-f]{8,}|upload_id=[^&]+")


@dataclasses.dataclass
class FaultPlan:
    """What to inject and, once run, what was injected (thread-safe counters)."""

    rate: float = 0.10  # share of attempts answered with one of `kinds`
    kinds: tuple[str, ...] = FAILURE_KINDS
    delay_rate: float = 0.05
    max_delay_s: float = 0.3
    max_consecutive: int = 2  # bound: attempt max_consecutive+1 of a key always passes
    seed: int = 0
    enabled: bool = False
    # Object name fragment -> a status ("403", "503") or "reset", the answer to every
    # request naming it, enabled or not and without bound: a 403 that is there for good,
    # a 503 that outlasts the client's retries. Counted in `injected` as "always_<kind>".
    always: dict[str, str] = dataclasses.field(default_factory=dict)
    injected: Counter = dataclasses.field(default_factory=Counter)
    requests: int = 0  # requests seen while enabled
    log: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (method, path)
    _attempts: Counter = dataclasses.field(default_factory=Counter)
    _streak: Counter = dataclasses.field(default_factory=Counter)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAILURE_KINDS)
        if unknown or not 0 <= self.rate < 1 or self.max_consecutive < 0:
            raise ValueError(f"bad fault plan: kinds {unknown or 'ok'}, rate {self.rate}")

    @contextlib.contextmanager
    def active(self) -> Iterator[FaultPlan]:
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    @property
    def failures(self) -> int:
        return sum(n for kind, n in self.injected.items() if kind in FAILURE_KINDS)

    def decide(self, method: str, path: str) -> tuple[str | None, float]:
        """(failure kind or None, delay in seconds) for this attempt."""
        with self._lock:
            self.log.append((method, path))
            name = urllib.parse.unquote(path)
            for fragment, status in self.always.items():
                if fragment in name:
                    self.injected[f"always_{status}"] += 1
                    return status, 0.0
            if not self.enabled:
                return None, 0.0
            self.requests += 1
            key = f"{method} {_VOLATILE.sub('*', path)}"
            attempt = self._attempts[key]
            self._attempts[key] += 1
            draw = _uniform(self.seed, key, attempt, "fail")
            kind = None
            if draw < self.rate and self._streak[key] < self.max_consecutive and self.kinds:
                kind = self.kinds[int(draw / self.rate * len(self.kinds)) % len(self.kinds)]
                if kind in _LOST_ANSWER_KINDS and _is_upload_chunk(method, path):
                    # fake-gcs-server forgets a session once its last chunk lands and
                    # answers the client's retransmit with 404; real GCS answers 200 with
                    # the object. So the answer to a chunk is lost before it is applied.
                    kind = "reset"
                self._streak[key] += 1
                self.injected[kind] += 1
            else:
                self._streak[key] = 0
            delay = 0.0
            if kind is None and _uniform(self.seed, key, attempt, "delay") < self.delay_rate:
                delay = self.max_delay_s * _uniform(self.seed, key, attempt, "length")
                self.injected["delay"] += 1
            return kind, delay


_LOST_ANSWER_KINDS = ("reset_after", "cut_body")


def _is_upload_chunk(method: str, path: str) -> bool:
    return method == "PUT" and "upload_id=" in path


def _uniform(seed: int, key: str, attempt: int, purpose: str) -> float:
    digest = hashlib.blake2b(f"{seed}|{key}|{attempt}|{purpose}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64


class _FaultyHandler(gcs_emulator._ProxyHandler):
    """The emulator proxy's forwarding, with a fault decided before each request."""

    server: _FaultyProxy

    def _forward(self) -> None:
        kind, delay = self.server.plan.decide(self.command, self.path)
        if kind is not None and kind.isdigit():  # 503, 429 or an `always` status
            self._read_body()
            self._answer_error(int(kind))
        elif kind == "reset":
            self._read_body()
            self._reset()
        else:
            if delay:
                time.sleep(delay)
            self._fault_after = kind  # consumed by _reply
            super()._forward()

    def _reply(self, response, data: bytes) -> None:
        kind = getattr(self, "_fault_after", None)
        self._fault_after = None
        if kind == "reset_after" or (kind == "cut_body" and len(data) <= 1):
            self._reset()  # applied upstream, answer lost
        elif kind == "cut_body":
            self.send_response_only(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in gcs_emulator._HOP_HEADERS:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
        else:
            super()._reply(response, data)

    def _answer_error(self, status: int) -> None:
        body = (b'{"error": {"code": %d, "message": "injected fault", "errors": '
                b'[{"reason": "backendError", "message": "injected fault"}]}}' % status)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends a TCP RST, what a dropped connection looks like.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


class _FaultyProxy(gcs_emulator._Proxy):
    def __init__(self, plan: FaultPlan) -> None:
        super().__init__()
        self.RequestHandlerClass = _FaultyHandler
        self.plan = plan

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up on the connections we reset: expected, not news


class FlakyGcsEmulator(GcsEmulator):
    """GcsEmulator whose clients all go through a `FaultPlan` (off until `plan.active()`)."""

    def __init__(self, plan: FaultPlan) -> None:
        super().__init__()
        self.plan = plan
        self._faulty: _FaultyProxy | None = None

    @property
    def url(self) -> str:
        if self._faulty is None:
            raise gcs_emulator.EmulatorError("the emulator is not running")
        return f"http://{gcs_emulator.HOST}:{self._faulty.port}"

    def _start_proxy(self) -> None:
        super()._start_proxy()  # the batch-fixing proxy, in front of the server
        assert self._proxy is not None
        self._faulty = _FaultyProxy(self.plan)
        self._faulty.upstream_port = self._proxy.port
        threading.Thread(target=self._faulty.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        super().stop()
        if self._faulty is not None:
            self._faulty.shutdown()
            self._faulty.server_close()
            self._faulty = None

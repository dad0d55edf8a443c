"""Decoding in worker processes beside the pipeline's own (the local in_memory runner).

Pillow and simplejpeg release the GIL while they decode, resize and encode, but the
Python between those calls holds it, and so does the pipeline's per-image work in the
runner's one thread: decode threads in a single process left cores idle. Here worker
processes decode instead, one per core; the decode step's threads read each file, send
its bytes to a free worker and wait, without the GIL, for the stored image to come back.

A worker is a plain Python child (`serve_stdio`) speaking
length-prefixed pickles over its stdin and stdout. It imports only the imaging code:
multiprocessing's spawn and forkserver would import the parent's main module (Apache
Beam) in each worker, and fork would copy a threaded process. A worker that dies on a
file (a crashing decoder) makes that file a dead letter, `decoder_crash`, and starts again:
one hostile file does not end the job. Where workers cannot start at all, the files decode
in the step's threads, as with `--decode_threads`.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

from pipelines.contract.imaging import DecodeError, ImageSpec, ProcessedImage, process_image

_LENGTH = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True)
class DecodeFailure:
    """Why a file did not become a stored image: a dead letter's reason and detail."""

    reason: str
    detail: str


def decode_or_failure(data: bytes, spec: ImageSpec) -> ProcessedImage | DecodeFailure:
    """`process_image`, with every way a file can fail to decode as a value."""
    try:
        return process_image(data, spec)
    except DecodeError as err:
        return DecodeFailure(err.reason, err.detail[:500])
    except Exception as err:  # noqa: BLE001 - a dead letter, never swallowed
        # PIL's decoders raise a zoo of types on crafted input (KeyError, struct.error,
        # ...): the file is bad, the job is not.
        return DecodeFailure("decoder_failure", f"{type(err).__name__}: {err}"[:500])


class WorkerDied(RuntimeError):
    """A worker process ended while it held a file."""


class WorkersUnavailable(RuntimeError):
    """A worker process ended before it was ready: they cannot start here at all."""


_READY = b"R"  # a worker's first byte on stdout: its imports are done


class _Worker:
    """One child process, started again in place after any failure: a worker whose
    streams may be out of step never serves another file."""

    def __init__(self):
        self._start()

    def _start(self) -> None:
        env = dict(os.environ)
        # The child finds the modules this process found, installed or not.
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p]
                                            + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # Imported by name, not run as __main__: replies must pickle as this module's classes.
        command = f"from {__name__} import serve_stdio; serve_stdio()"
        self._process = subprocess.Popen([sys.executable, "-c", command], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._ready = False
        self._broken = False

    def call(self, data: bytes, spec: ImageSpec) -> ProcessedImage | DecodeFailure:
        """Raises WorkerDied (the file killed it), WorkersUnavailable (it never started)."""
        if self._broken or self._process.poll() is not None:  # e.g. killed while idle
            self.close()
            self._start()
        try:
            if not self._ready:
                if self._process.stdout.read(len(_READY)) != _READY:
                    raise WorkersUnavailable(f"a decode worker exited with status "
                                             f"{self._process.wait()} before it was ready")
                self._ready = True
            _send(self._process.stdin, (data, spec))
            return _receive(self._process.stdout)
        except (OSError, EOFError) as err:
            self._broken = True
            raise WorkerDied(f"exit status {self._process.wait()}") from err
        except BaseException:
            self._broken = True
            raise

    def close(self) -> None:
        try:
            self._process.stdin.close()  # the worker's loop ends at end of input
            self._process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()


class DecodeWorkers:
    """`count` worker processes, each serving one calling thread at a time."""

    def __init__(self, count: int):
        self._all = [_Worker() for _ in range(count)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._all:
            self._idle.put(worker)
        self._unavailable = False

    def decode(self, data: bytes, spec: ImageSpec) -> ProcessedImage | DecodeFailure:
        """`decode_or_failure(data, spec)` in a free worker; waits for one. Where workers
        cannot start at all, decodes in this thread instead (and says so once)."""
        if self._unavailable:
            return decode_or_failure(data, spec)
        worker = self._idle.get()
        try:
            return worker.call(data, spec)
        except WorkerDied as err:
            return DecodeFailure("decoder_crash", f"the decoding process died ({err})")
        except WorkersUnavailable as err:
            if not self._unavailable:
                self._unavailable = True
                print(f"[preprocess] {err}; decoding in this process instead",
                      file=sys.stderr)
            return decode_or_failure(data, spec)
        finally:
            self._idle.put(worker)  # it starts again on its next call if it must

    def close(self) -> None:
        for worker in self._all:
            worker.close()


_SHARED: dict[int, DecodeWorkers] = {}
_SHARED_LOCK = threading.Lock()


def shared(count: int) -> DecodeWorkers:
    """This process's `count` workers, started on first use and kept to its exit: every
    pipeline run in one process (tests, `imagebeam run`) reuses them."""
    with _SHARED_LOCK:
        if not _SHARED:
            atexit.register(close_shared)
        if count not in _SHARED:
            _SHARED[count] = DecodeWorkers(count)
        return _SHARED[count]


def close_shared() -> None:
    """Ends this process's shared workers and waits for them (a process that leaves
    with os._exit skips atexit, and would leave them to finish unwaited)."""
    with _SHARED_LOCK:
        for workers in _SHARED.values():
            workers.close()
        _SHARED.clear()


def _send(stream: BinaryIO, value: object) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: BinaryIO) -> object:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("the stream ended")
    (size,) = _LENGTH.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the stream ended inside a message")
    return pickle.loads(payload)


def _serve(requests: BinaryIO, replies: BinaryIO) -> None:
    while True:
        try:
            data, spec = _receive(requests)
        except EOFError:
            return
        _send(replies, decode_or_failure(data, spec))



def serve_stdio() -> None:
    """A worker's life: requests on stdin, replies on stdout, until stdin ends."""
    # The parent ends a worker by closing its input; Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt replies
    replies.write(_READY)
    replies.flush()
    _serve(sys.stdin.buffer, replies)

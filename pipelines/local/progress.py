"""Live progress of a local run: workers count, the launcher prints.

DirectRunner workers are separate processes, so each decode DoFn instance keeps
its running count in a small file under a local folder (rewritten at most a few
times a second) and the launcher sums them. Used only when the runner is local;
on Dataflow the job's own page shows the counters.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid


class WorkerCounter:
    """One DoFn instance's count, published to `directory` (throttled)."""

    def __init__(self, directory: str, interval_s: float = 0.25):
        self._path = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex}.count")
        self._interval_s = interval_s
        self._count = 0
        self._last_write = 0.0

    def add(self, n: int = 1) -> None:
        self._count += n
        now = time.monotonic()
        if now - self._last_write >= self._interval_s:
            self.flush()
            self._last_write = now

    def flush(self) -> None:
        temporary = self._path + ".tmp"
        with open(temporary, "w") as handle:
            handle.write(str(self._count))
        os.replace(temporary, self._path)  # readers never see a half-written number


def total_count(directory: str) -> int:
    total = 0
    for name in os.listdir(directory):
        if name.endswith(".count"):
            try:
                with open(os.path.join(directory, name)) as handle:
                    total += int(handle.read() or 0)
            except (OSError, ValueError):
                continue  # a file being replaced right now; next tick reads it
    return total


class ProgressPrinter:
    """Prints `done/total (rate/s)` to stderr once a second while a run goes on."""

    def __init__(self, directory: str, total: int, label: str = "images", stream=sys.stderr):
        self._directory = directory
        self._total = total
        self._label = label
        self._stream = stream
        self._interactive = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._started = 0.0

    def __enter__(self) -> ProgressPrinter:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._print(final=True)

    def _loop(self) -> None:
        # A terminal gets one line redrawn every second; a log file a line every 10 s.
        interval = 1.0 if self._interactive else 10.0
        while not self._stop.wait(interval):
            self._print(final=False)

    def _print(self, final: bool) -> None:
        done = total_count(self._directory)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        line = (f"[preprocess] {done}/{self._total} {self._label} decoded "
                f"({done / elapsed:.0f}/s, {elapsed:.0f}s)")
        if self._interactive:
            self._stream.write("\r" + line + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

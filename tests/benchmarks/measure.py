"""Wall time and peak memory of a command and all its child processes, and optionally the
CPU time of each of them.

`/usr/bin/time -v` reports the largest single process; a multi-process DirectRunner
needs the sum over the process tree, so we sample /proc every 100 ms.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_tree_rss_mb: float
    returncode: int
    output: str
    pid: int = 0
    # With `track_cpu`: pid -> (command line when first seen, user + system CPU seconds when
    # last seen, i.e. up to 100 ms short of its end).
    cpu_s_by_process: dict[int, tuple[str, float]] = dataclasses.field(default_factory=dict)


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(c) for c in handle.read().split())
    except OSError:
        pass
    return found


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of `pid` so far (/proc/<pid>/stat utime + stime)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as handle:
            return handle.read().replace("\0", " ").strip()
    except OSError:
        return ""


def _tree(root: int) -> list[int]:
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(_children(pid))
    return pids


def tree_rss_mb(root: int) -> float:
    return sum(_rss_kb(pid) for pid in _tree(root)) / 1024


def run_measured(command: Sequence[str], env: dict | None = None,
                 track_cpu: bool = False) -> Measured:
    """Runs `command`, sampling the RSS of its process tree; returns the peak, and with
    `track_cpu` the CPU time of every process of the tree."""
    started = time.monotonic()
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})}, text=True)
    peak = 0.0
    cpu: dict[int, tuple[str, float]] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, tree_rss_mb(process.pid))
            for pid in _tree(process.pid) if track_cpu else ():
                seconds = _cpu_s(pid)
                if seconds is not None:
                    # The first command line seen: an exited child's reads empty.
                    cpu[pid] = (cpu[pid][0] if pid in cpu else _cmdline(pid), seconds)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    return Measured(time.monotonic() - started, peak, process.returncode, output, process.pid,
                    cpu)

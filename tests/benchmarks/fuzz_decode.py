"""Tens of thousands of mutated and crafted images through `process_image`
(`pipelines.contract.imaging`).

    .venv/bin/python -m tests.benchmarks.fuzz_decode [--cases 50000] [--seed 0]
        [--timeout_s 10] [--memory_mb 3072] [--workers N] [--replay SEED:INDEX]
    .venv/bin/python -m tests.benchmarks.fuzz_decode --serving

Every input must either decode or raise DecodeError (a dead letter). Each case runs in a
worker process capped by RLIMIT_AS (`--memory_mb`) and watched by a per-case wall-clock
timeout; a worker that hangs is killed, one that dies (segfault, OOM) is replaced, and
workers are recycled every few hundred cases so each one's peak RSS describes few cases.
Prints counts (decoded / dead letter by reason / crashes by exception / timeouts / worker
deaths / MemoryError), the slowest cases, the largest RSS, and how to replay each failure.
Exit status 1 if anything but decoded/dead-letter happened.

`--serving` instead runs each crafted case through the pipeline and through the serving
graph (`pipelines.contract.imaging_tf`, traced) in this process, and prints both outcomes and
times; exit status 1 if a file the pipeline refuses from its header is not refused by the
serving graph for the same reason.
"""

from __future__ import annotations

import os

# One thread per worker: the RLIMIT_AS budget is per process, and BLAS thread pools
# reserve address space they never use.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from multiprocessing.connection import Connection, wait  # noqa: E402

from pipelines.contract.imaging import DecodeError, ImageSpec, process_image  # noqa: E402
from tests import fuzz_images  # noqa: E402

RECYCLE_AFTER = 400  # cases per worker process before a fresh one takes over
SPEC = ImageSpec(224, 224)  # the pipeline's default target
# Dead-letter reasons the serving graph's header guards raise too (as InvalidArgumentError).
HEADER_REASONS = ("not_an_image", "too_many_pixels", "too_many_scans")


@dataclasses.dataclass(frozen=True)
class Case:
    key: str  # "hostile:<name>" or "<seed>:<index>"

    def data(self) -> bytes:
        if self.key.startswith("hostile:"):
            return fuzz_images.hostile_images()[self.key.removeprefix("hostile:")]
        seed, index = self.key.split(":")
        return fuzz_images.case(int(seed), int(index))[2]


def _run_one(data: bytes) -> str:
    try:
        process_image(data, SPEC)
    except DecodeError as err:
        return f"dead_letter:{err.reason}"
    except MemoryError:
        return "memory_error"
    except Exception as err:  # noqa: BLE001 - this is what the fuzzer is looking for
        return f"crash:{type(err).__name__}: {str(err)[:120]}"
    return "decoded"


def _worker(conn: Connection, memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    warnings.simplefilter("ignore")  # PIL warns on every corrupt EXIF block
    fuzz_images.seed_images()  # build the seeds before the first timed case
    while (key := conn.recv()) is not None:
        data = Case(key).data()
        started = time.perf_counter()
        outcome = _run_one(data)
        elapsed = time.perf_counter() - started
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send((outcome, elapsed, peak_kb, len(data)))


@dataclasses.dataclass
class _Slot:
    process: multiprocessing.Process
    conn: Connection
    key: str | None = None
    started: float = 0.0
    done: int = 0


@dataclasses.dataclass
class Report:
    outcomes: Counter = dataclasses.field(default_factory=Counter)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> outcome
    slowest: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_rss_key: str = ""
    largest_input: int = 0
    cases: int = 0

    def add(self, key: str, outcome: str, elapsed: float, peak_kb: int, size: int) -> None:
        self.cases += 1
        self.outcomes[_bucket(outcome)] += 1
        if not (outcome == "decoded" or outcome.startswith("dead_letter")):
            self.failures.setdefault(key, outcome)
        self.slowest = sorted([*self.slowest, (elapsed, key, outcome)], reverse=True)[:5]
        if peak_kb / 1024 > self.peak_rss_mb:
            self.peak_rss_mb, self.peak_rss_key = peak_kb / 1024, key
        self.largest_input = max(self.largest_input, size)


def _bucket(outcome: str) -> str:
    """'crash:KeyError: 3' -> 'crash:KeyError'; 'timeout:over 10s' -> 'timeout'."""
    kind, _, rest = outcome.partition(":")
    if kind in ("dead_letter", "worker_died"):
        return outcome
    if kind == "crash":
        return f"crash:{rest.split(':')[0]}"
    return kind


def fuzz(keys: list[str], workers: int, timeout_s: float, memory_mb: int) -> Report:
    """Runs every case key through the worker pool; returns what happened."""
    context = multiprocessing.get_context("fork")  # seeds and imports are shared, cheap
    report = Report()
    pending = list(reversed(keys))

    def spawn() -> _Slot:
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, memory_mb << 20), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def retire(slot: _Slot, kill: bool) -> None:
        if kill:
            slot.process.kill()
        else:
            slot.conn.send(None)
        slot.process.join(5)
        slot.conn.close()

    slots = [spawn() for _ in range(workers)]
    while True:
        for index, slot in enumerate(slots):
            if slot.key is None and pending:
                if slot.done >= RECYCLE_AFTER:
                    retire(slot, kill=False)
                    slot = slots[index] = spawn()
                slot.key, slot.started = pending.pop(), time.monotonic()
                slot.conn.send(slot.key)
        busy = [slot for slot in slots if slot.key is not None]
        if not busy:
            break
        ready = wait([slot.conn for slot in busy], timeout=0.2)
        now = time.monotonic()
        for index, slot in enumerate(slots):
            if slot.key is None:
                continue
            if slot.conn in ready:
                try:
                    outcome, elapsed, peak_kb, size = slot.conn.recv()
                except EOFError:  # the worker died mid-case: segfault, abort, kernel OOM
                    slot.process.join(5)
                    outcome = f"worker_died:exit {slot.process.exitcode}"
                    report.add(slot.key, outcome, now - slot.started, 0, 0)
                    slots[index] = spawn()
                    continue
                report.add(slot.key, outcome, elapsed, peak_kb, size)
                slot.key, slot.done = None, slot.done + 1
            elif now - slot.started > timeout_s:
                report.add(slot.key, f"timeout:over {timeout_s:g}s", now - slot.started, 0, 0)
                retire(slot, kill=True)
                slots[index] = spawn()
    for slot in slots:
        retire(slot, kill=False)
    return report


def serving_parity() -> int:
    """Crafted cases through both decode paths; 1 if a header refusal differs."""
    import tensorflow as tf  # only here: the forked workers never load TensorFlow

    from pipelines.contract import imaging_tf

    serve = tf.function(
        lambda data: imaging_tf.process_image(data, (SPEC.height, SPEC.width), SPEC.resize,
                                              SPEC.max_pixels),
        input_signature=[tf.TensorSpec([], tf.string)])
    serve(tf.constant(fuzz_images.seed_images()["baseline.jpg"]))  # traced before timing
    mismatches = 0
    print(f"{'case':46s} {'pipeline':28s} {'ms':>8s}   {'serving graph':28s} {'ms':>8s}")
    for name, data in fuzz_images.hostile_images().items():
        started = time.perf_counter()
        pipeline = _run_one(data)
        pipeline_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        try:
            serve(tf.constant(data))
            serving = "decoded"
        except tf.errors.InvalidArgumentError as err:  # the guard's message: [reason...]
            found = re.search(r"\[(\w+)", err.message)
            serving = f"dead_letter:{found.group(1) if found else 'other'}"
        serving_ms = (time.perf_counter() - started) * 1000
        differs = pipeline.removeprefix("dead_letter:") in HEADER_REASONS and serving != pipeline
        mismatches += differs
        print(f"{name:46s} {pipeline:28s} {pipeline_ms:8.1f}   {serving:28s} {serving_ms:8.1f}"
              + ("  MISMATCH" if differs else ""))
    print(f"{mismatches} header refusals differ between the pipeline and the serving graph")
    return 1 if mismatches else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=50_000, help="mutated cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout_s", type=float, default=10.0, help="per case")
    parser.add_argument("--memory_mb", type=int, default=3072, help="RLIMIT_AS per worker")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--replay", help="run one case key in this process and show it")
    parser.add_argument("--serving", action="store_true",
                        help="crafted cases through the pipeline and the serving graph")
    args = parser.parse_args(argv)
    if args.serving:
        return serving_parity()
    if args.replay:
        data = Case(args.replay).data()
        print(f"{args.replay}: {len(data)} bytes -> {_run_one(data)}")
        return 0
    keys = [f"hostile:{name}" for name in fuzz_images.hostile_images()]
    keys += [f"{args.seed}:{index}" for index in range(args.cases)]
    started = time.monotonic()
    report = fuzz(keys, args.workers, args.timeout_s, args.memory_mb)
    wall = time.monotonic() - started
    print(f"cases: {report.cases} ({len(fuzz_images.hostile_images())} crafted + "
          f"{args.cases} mutated, seed {args.seed}) in {wall:.0f}s on {args.workers} workers "
          f"({report.cases / wall:.0f}/s)")
    for outcome, count in sorted(report.outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {count:7d}  {outcome}")
    print("slowest cases:")
    for elapsed, key, outcome in report.slowest:
        print(f"  {elapsed * 1000:8.1f} ms  {key}  {outcome}")
    print(f"peak worker RSS: {report.peak_rss_mb:.0f} MB (case {report.peak_rss_key}); "
          f"largest input {report.largest_input / 1e6:.1f} MB; RLIMIT_AS {args.memory_mb} MB")
    if report.failures:
        print(f"FAILURES ({len(report.failures)}); replay one with --replay KEY:")
        for key, outcome in list(report.failures.items())[:30]:
            print(f"  {key}  {outcome}")
        return 1
    print("no crashes, timeouts or memory errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

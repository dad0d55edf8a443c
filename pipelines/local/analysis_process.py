"""Local runs: tf.Transform's analysis in a second process, started before the pipeline.

Why: most of what the statistics phase costs a local run is fixed: importing TensorFlow
and tf.Transform, then tracing the preprocessing_fn. In the pipeline's own process all
of it runs while the pipeline is built,
before the first image is decoded, on one core while the other idles. A process of its
own, forked at the top of `preprocess.run`, does it while this one lists, builds and
decodes; the pipeline hands it the train split's analyzer instances once duplicates are
merged and collects the written transform after the shards are written, so the analysis
itself runs beside the shard writing too. What it saves and costs:
`python -m tests.benchmarks.stats_overhead` (docs/performance.md).

    preprocess.run ── start() ──> child: import TF + tf.Transform, build its pipeline,
    pipeline: ... MergeDuplicates ─ SendToAnalysis (instances file, "go") ──> child runs
              ... WriteShards ─── AwaitAnalysis <── "done" (transform_output written)

Used only with the local in-memory runner (the pipeline's steps run in this process,
which holds the child's pipes: `AnalysisProcess` objects are found by token), only while
this process has not loaded TensorFlow (then there is no import left to hide) and only
where forking is safe (`useful`).
Everywhere else `analyzers.AnalyzeTrainSplit` runs the analysis inside the pipeline.
Both run `analyzers.AnalyzeInstances` over the same instances, so their outputs match
(tests/test_analysis_process.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.contract import records
from pipelines.preprocessing.options import beam_options, local_runner, runs_in_this_process
from pipelines.stats import analyzers

INSTANCES = "instances.tfrecord"  # in the work folder: the train split's serialized instances
_GO = "go"  # parent -> child: the instances file is complete
_DONE = "done"  # child -> parent: the transform output is written
_STDERR_LOG = "stderr.log"  # in the work folder: the child's stderr (TensorFlow's C++ lines)
_STDERR_TAIL_BYTES = 3000
_LOCK = ".lock"  # in the work folder: flock-ed while its run lives (see remove_abandoned...)
_WORK_DIR_PREFIX = "imagebeam-analysis-"  # in the temp folder
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_ABANDONED_AFTER_S = 60  # a lock file this old and not held belongs to a dead run
_LIVENESS_CHECK_S = 1.0  # how often a waiting side checks that the other is still there

_RUNNING: dict[str, AnalysisProcess] = {}  # token -> process, for the pipeline's steps


class AnalysisFailed(RuntimeError):
    """The analysis process failed or died without writing the transform output."""


class AnalysisProcess:
    """A child process running tf.Transform's analysis over instances it is handed.

    `start()` forks it; `submit(instances)` hands it the train split's serialized
    instances; `wait()` returns the local folder holding the written transform output;
    `close()` stops it if still running and removes its work folder.

    Forked, not spawned: the child starts with this process's modules (Beam's import,
    ~1.2 s of CPU, is not paid twice) and shares their memory pages until written.
    Forking is safe here because it happens before this process starts any Python thread
    (`started` runs first in `preprocess.run`; `useful` checks), the native threads that
    exist by then (OpenBLAS's, jemalloc's) have fork handlers, and the child never
    returns into the parent's code: it ends with os._exit. It dies with the parent
    (PR_SET_PDEATHSIG), so a killed run leaves no process behind.
    """

    def __init__(self, work_dir: str, process, connection, lock):
        self.work_dir = work_dir
        self.token = uuid.uuid4().hex
        self._process = process
        self._connection = connection
        self._lock = lock

    @classmethod
    def start(cls) -> AnalysisProcess:
        remove_abandoned_work_dirs()
        work_dir = tempfile.mkdtemp(prefix=_WORK_DIR_PREFIX)
        lock = open(os.path.join(work_dir, _LOCK), "wb")  # noqa: SIM115 - held until close()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        context = multiprocessing.get_context("fork")
        parent_end, child_end = context.Pipe()
        sys.stdout.flush()  # or the child would inherit, and print again, what is buffered
        sys.stderr.flush()
        process = context.Process(target=_child,
                                  args=(work_dir, child_end, parent_end, os.getpid()),
                                  name="imagebeam-analysis", daemon=True)
        process.start()
        child_end.close()  # with the child's copy of parent_end closed too, EOF means death
        analysis = cls(work_dir, process, parent_end, lock)
        _RUNNING[analysis.token] = analysis
        return analysis

    @property
    def transform_dir(self) -> str:
        return os.path.join(self.work_dir, analyzers.TRANSFORM_OUTPUT)

    def submit(self, instances: list[bytes]) -> None:
        """Writes the instances (sorted: the float64 sums then add up in one order on
        every run) and lets the child run."""
        path = os.path.join(self.work_dir, INSTANCES)
        with open(path + ".partial", "wb") as handle:
            for instance in sorted(instances):
                _TFRecordUtil.write_record(handle, instance)
        os.replace(path + ".partial", path)
        try:
            self._connection.send(_GO)
        except OSError as err:  # the child is gone; a failure it reported may be waiting
            raise self._failure(self._reported() or f"it ended early ({err})") from err

    def wait(self) -> str:
        """Blocks until the child has written the transform output; its local folder."""
        try:
            while not self._connection.poll(_LIVENESS_CHECK_S):
                if not self._process.is_alive() and not self._connection.poll():
                    raise EOFError  # died without a word (and EOF may never come)
            status, detail = self._connection.recv()
        except (EOFError, OSError) as err:  # EOF, or reset by a child killed mid-message
            raise self._failure(f"it died ({type(err).__name__})") from err
        if status != _DONE:
            raise self._failure(f"it failed:\n{detail}")
        return self.transform_dir

    def close(self) -> None:
        _RUNNING.pop(self.token, None)
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._connection.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self._lock.close()

    def _reported(self) -> str | None:
        """The failure the child sent before it exited, if one is waiting in the pipe."""
        try:
            if self._connection.poll():
                status, detail = self._connection.recv()
                return f"it failed:\n{detail}" if status != _DONE else None
        except (EOFError, OSError):
            pass
        return None

    def _failure(self, what: str) -> AnalysisFailed:
        self._process.join(timeout=10)
        return AnalysisFailed(f"the tf.Transform analysis process (exit code "
                              f"{self._process.exitcode}) wrote no output: {what}"
                              f"{self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        try:
            with open(os.path.join(self.work_dir, _STDERR_LOG), "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - _STDERR_TAIL_BYTES))
                tail = log.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"\nits stderr ended:\n{tail}" if tail else ""


def remove_abandoned_work_dirs() -> None:
    """Removes the work folders of runs that died without cleaning up (killed with
    SIGKILL, as when a container dies). A live run holds an flock on its folder's lock
    file (the child inherits it), so only folders whose lock can be taken are removed;
    folders without a lock file, or with one under a minute old, are left alone."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), _WORK_DIR_PREFIX + "*")):
        path = os.path.join(folder, _LOCK)
        try:
            if time.time() - os.stat(path).st_mtime < _ABANDONED_AFTER_S:
                continue  # perhaps created a moment ago, not locked yet
            with open(path, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # no lock file, or a live run holds it
            continue


def running(token: str) -> AnalysisProcess:
    """The started process `token` (a module function: steps that call it pickle a
    reference to it, not the registry of live processes)."""
    return _RUNNING[token]


def useful(options: PipelineOptions) -> bool:
    """Whether a run with these options gains from the analysis process, and can fork it
    safely: the local in-memory runner, in a process that has not loaded TensorFlow yet.

    Forking is kept to Linux and to a process running one Python thread (the command
    line; not a notebook kernel, whose threads could hold a lock the child then waits on
    forever); macOS's system libraries are not fork-safe (why Python spawns there)."""
    return (runs_in_this_process(options) and "tensorflow" not in sys.modules
            and sys.platform == "linux" and threading.active_count() == 1)


@contextlib.contextmanager
def started(options: PipelineOptions) -> Iterator[str | None]:
    """The token of a started AnalysisProcess where `useful(options)`, else None (also
    when it cannot start: the analysis then runs in the pipeline); the process is
    stopped and its folder removed on exit."""
    if not useful(options):
        yield None
        return
    try:
        analysis = AnalysisProcess.start()
    except OSError as err:  # no temp folder, no memory to fork: the slower path still works
        print(f"[preprocess] no analysis process ({err}); tf.Transform runs in the pipeline",
              file=sys.stderr)
        yield None
        return
    try:
        yield analysis.token
    finally:
        analysis.close()


class AnalyzeInProcess(beam.PTransform):
    """UniqueImage (every split) -> the relative path `transform_output`, once written;
    what `analyzers.AnalyzeTrainSplit` does, with the analysis in the process `token`.

    `after`: a PCollection to wait for before collecting the result (the written shards),
    so this step does not hold up the ones the analysis can run beside.
    """

    def __init__(self, token: str, output: str, train_split: str, pixel_count: int, after):
        super().__init__()
        self._token = token
        self._output = output
        self._train_split = train_split
        self._pixel_count = pixel_count
        self._after = after

    def expand(self, unique_images):
        token = self._token
        final = FileSystems.join(self._output, analyzers.TRANSFORM_OUTPUT)

        def send(instances: list[bytes]) -> int:
            running(token).submit(instances)
            return len(instances)

        def collect(_, sent: int, after) -> str:  # side inputs only order it: see `after`
            analyzers.copy_local_tree(running(token).wait(), final)
            return analyzers.TRANSFORM_OUTPUT

        sent = (
            unique_images
            | "TrainInstances" >> analyzers.TrainInstances(self._train_split,
                                                           self._pixel_count)
            | "AllInstances" >> beam.combiners.ToList()
            | "SendToAnalysis" >> beam.Map(send)
        )
        return (
            unique_images.pipeline
            | "AnalysisResult" >> beam.Create([None])
            | "AwaitAnalysis" >> beam.Map(collect, sent=beam.pvalue.AsSingleton(sent),
                                          after=beam.pvalue.AsIter(self._after))
        )


def _child(work_dir: str, connection, parent_end, parent_pid: int) -> None:
    """The analysis process: build the pipeline over the instances file (this imports
    TensorFlow and tf.Transform and traces the graph), wait for "go", run it, report."""
    parent_end.close()  # the parent's end lives only in the parent: its death is EOF here
    # TensorFlow's C++ start-up lines (oneDNN, CUDA probing: ~5 lines a run, which
    # TF_CPP_MIN_LOG_LEVEL does not stop before absl's logging is initialised) go to a
    # file, not the user's terminal; a failure's traceback comes over the pipe, and the
    # file's tail is added to the error when the process dies without one.
    log = os.open(os.path.join(work_dir, _STDERR_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)
    os.close(log)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops this process
    _die_with(parent_pid)
    code = 1
    try:
        code = _analyze(work_dir, connection)
    except BaseException:  # noqa: BLE001 - any failure: its traceback is the parent's error text
        with contextlib.suppress(OSError):
            connection.send(("failed", traceback.format_exc()))
    # Never return into the parent's code (this is a fork of it), and skip the teardown:
    # tf.Transform leaves reference cycles whose collection can crash the interpreter at
    # exit (see preprocess.main); the output is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _analyze(work_dir: str, connection) -> int:
    options = beam_options([])
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    _ = (
        pipeline
        | "InstancesFile" >> beam.Create([os.path.join(work_dir, INSTANCES)])
        | "ReadInstances" >> beam.FlatMap(_read_records)
        | "AnalyzeInstances" >> analyzers.AnalyzeInstances(
            os.path.join(work_dir, analyzers.TRANSFORM_OUTPUT), os.path.join(work_dir, "tmp"))
    )
    try:
        message = connection.recv()
    except (EOFError, OSError):
        message = None
    if message != _GO:  # the parent went away before handing over the instances
        shutil.rmtree(work_dir, ignore_errors=True)
        return 3
    pipeline.run().wait_until_finish()
    connection.send((_DONE, None))
    return 0


def _die_with(parent_pid: int) -> None:
    """Asks Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG): a
    parent killed with SIGKILL or SIGTERM runs no cleanup, and this process would live
    on holding ~0.7 GB."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # it died before the request took effect
        os._exit(3)


def _read_records(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from records.read_records(handle)

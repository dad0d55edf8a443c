"""Decoding in worker processes: the same images and dead letters as decoding here, and a
worker that dies costs one file, not the job."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from pipelines.contract.imaging import ImageSpec, ResizeMode
from pipelines.preprocessing import decode_workers
from pipelines.preprocessing.decode_workers import DecodeFailure, DecodeWorkers, decode_or_failure
from tests import corpus

SPEC = ImageSpec(24, 32, resize=ResizeMode.CROP)


@pytest.fixture(scope="module")
def workers():
    pool = DecodeWorkers(2)
    yield pool
    pool.close()


def test_workers_store_what_decoding_here_stores_and_fail_the_same_files(workers):
    files = dict(corpus.every_encoding())
    files.update({name: data for name, (data, _) in corpus.broken_files().items()})
    for name, data in sorted(files.items()):
        here = decode_or_failure(data, SPEC)
        assert workers.decode(data, SPEC) == here, name
    failures = [decode_or_failure(data, SPEC) for data, _ in corpus.broken_files().values()]
    assert failures and all(isinstance(f, DecodeFailure) for f in failures)
    assert [f.reason for f in failures] == [r for _, r in corpus.broken_files().values()]


class _ExitsWhenUnpickled:
    """Stands in for a file that crashes the decoder: the worker dies reading it."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_worker_that_dies_makes_one_dead_letter_and_is_replaced(workers):
    good = corpus.every_encoding()["baseline.jpg"]
    crashed = workers.decode(b"", _ExitsWhenUnpickled())
    assert crashed == DecodeFailure("decoder_crash", "the decoding process died (exit status 3)")
    # Both workers (the restarted one among them) still decode.
    results = [workers.decode(good, SPEC) for _ in range(4)]
    assert results == [decode_or_failure(good, SPEC)] * 4


def test_a_worker_killed_while_idle_is_started_again_without_blaming_the_next_file():
    good = corpus.every_encoding()["baseline.jpg"]
    pool = DecodeWorkers(1)
    try:
        assert pool.decode(good, SPEC) == decode_or_failure(good, SPEC)
        (worker,) = pool._all
        os.kill(worker._process.pid, signal.SIGKILL)
        worker._process.wait()
        assert pool.decode(good, SPEC) == decode_or_failure(good, SPEC)
    finally:
        pool.close()


def test_where_workers_cannot_start_files_decode_in_this_process(monkeypatch, capsys):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # every worker exits at once
    pool = DecodeWorkers(2)
    try:
        files = [corpus.every_encoding()["baseline.jpg"], b""]
        assert [pool.decode(d, SPEC) for d in files * 2] == [
            decode_or_failure(d, SPEC) for d in files * 2]
    finally:
        pool.close()
    assert capsys.readouterr().err.count("decoding in this process instead") == 1


def test_shared_workers_are_started_once_and_closed_on_request():
    first = decode_workers.shared(1)
    assert decode_workers.shared(1) is first
    decode_workers.close_shared()
    assert decode_workers.shared(1) is not first
    decode_workers.close_shared()

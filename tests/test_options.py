"""Local runner defaults: in_memory unless the user picks a mode (see beam_options)."""

import os

from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from pipelines.preprocessing.options import (
    PreprocessConfig,
    beam_options,
    decode_processes,
    decode_threads,
    local_runner,
)


def test_local_default_is_the_in_memory_direct_runner():
    options = beam_options([])
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert options.view_as(DirectOptions).direct_running_mode == "in_memory"


def test_an_explicit_running_mode_is_kept():
    options = beam_options(["--direct_running_mode", "multi_threading",
                            "--direct_num_workers", "2"])
    direct = options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_threading", 2)


def test_decode_threads_use_every_core_only_where_bundles_run_one_at_a_time():
    auto = PreprocessConfig(output="unused")
    assert decode_threads(auto, beam_options([])) == (os.cpu_count() or 1)
    threaded = beam_options(["--direct_running_mode", "multi_threading"])
    assert decode_threads(auto, threaded) == 1
    assert decode_threads(auto, beam_options(["--runner", "DataflowRunner"])) == 1
    assert decode_threads(PreprocessConfig(output="unused", decode_threads=5), threaded) == 5


def test_worker_processes_decode_only_for_the_in_process_runner_on_several_cores(monkeypatch):
    auto = PreprocessConfig(output="unused")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert decode_processes(auto, beam_options([])) == 4
    assert decode_processes(auto, beam_options(["--direct_running_mode", "multi_threading"])) == 0
    assert decode_processes(auto, beam_options(["--runner", "DataflowRunner"])) == 0
    # --decode_threads asks for threads in this process.
    assert decode_processes(PreprocessConfig(output="unused", decode_threads=2),
                            beam_options([])) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert decode_processes(auto, beam_options([])) == 0


def test_the_direct_runner_names_run_in_process_without_trying_prism():
    # Beam's own DirectRunner would first try to download and start the Prism runner.
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    for args in ([], ["--runner", "DirectRunner"],
                 ["--direct_running_mode", "multi_threading"]):
        assert isinstance(local_runner(beam_options(args)), FnApiRunner), args
    for runner in ("PrismRunner", "DataflowRunner"):
        assert local_runner(beam_options(["--runner", runner])) is None


def test_the_in_process_runner_runs_a_pipeline():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    options = beam_options([])
    with beam.Pipeline(runner=local_runner(options), options=options) as pipeline:
        assert_that(pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * x),
                    equal_to([1, 4, 9]))

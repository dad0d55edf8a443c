"""Local runner defaults: in_memory unless the user picks a mode (see beam_options)."""

import os

from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from pipelines.options import PreprocessConfig, beam_options, decode_threads


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

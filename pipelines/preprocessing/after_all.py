"""A step that runs once, after every input it reads as a side input is complete."""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam


class AfterAll(beam.PTransform):
    """`pipeline | "Label" >> AfterAll(fn, name=AsList(pcoll), ...)`: calls
    `fn(None, name=<the whole pcoll>, ...)` once, when every side input is complete, and
    outputs what it returns. Beam runs a step only once its side inputs are materialized,
    which is what makes "write the manifest last" hold on every runner."""

    def __init__(self, fn: Callable, **side_inputs):
        super().__init__()
        self._fn, self._side_inputs = fn, side_inputs

    def expand(self, pipeline):
        return (pipeline
                | "Once" >> beam.Create([None])
                | "Run" >> beam.Map(self._fn, **self._side_inputs))

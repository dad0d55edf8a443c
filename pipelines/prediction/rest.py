"""TF Serving's REST predict body (which Vertex AI endpoints take as is) mapped onto a
signature's inputs, and the signature's outputs mapped back, the way TF Serving does it
(https://www.tensorflow.org/tfx/serving/api_rest#request_format_2):

    {"instances": [{"image_bytes": {"b64": "..."}}, ...]}    row format
    {"instances": [{"b64": "..."}, ...]}                      row format, one input
    {"inputs": {"image_bytes": [{"b64": "..."}, ...]}}        columnar format
    {"inputs": [{"b64": "..."}, ...]}                         columnar format, one input

A `{"b64": ...}` object is base64-decoded to bytes; rows are stacked per input name
into one batch. Answers: {"predictions": [one object per row]}, a string output named
`*_bytes` base64-encoded as `{"b64": ...}`, other strings as UTF-8 text.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import numpy as np


class RequestError(ValueError):
    """A body TF Serving would answer with 400."""


def _value(value):
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise RequestError(f"an object value must be {{'b64': ...}}, got keys {sorted(value)}")
        return base64.b64decode(value["b64"], validate=True)
    if isinstance(value, list):
        return [_value(item) for item in value]
    return value


def request_inputs(body: Mapping, input_names: Sequence[str]) -> dict[str, list]:
    """{input name: list of values, one per instance} from a REST body; raises
    RequestError for a body TF Serving refuses."""
    if ("instances" in body) == ("inputs" in body):
        raise RequestError("the body must hold exactly one of 'instances' and 'inputs'")
    if "inputs" in body:
        columns = body["inputs"]
        if not isinstance(columns, dict) or set(columns) == {"b64"}:
            if len(input_names) != 1:
                raise RequestError(f"a bare 'inputs' needs a signature of one input, not "
                                   f"{list(input_names)}")
            columns = {input_names[0]: columns}
        return {name: _value(columns[name]) for name in _checked(columns, input_names)}
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError("'instances' must be a non-empty list")
    named = [isinstance(row, dict) and set(row) != {"b64"} for row in instances]
    if not all(named):
        if any(named) or len(input_names) != 1:
            raise RequestError("instances must all be objects keyed by input name, or, for "
                               "a signature of one input, all bare values")
        return {input_names[0]: [_value(row) for row in instances]}
    for row in instances:
        _checked(row, input_names)
    return {name: [_value(row[name]) for row in instances] for name in input_names}


def _checked(named: Mapping, input_names: Sequence[str]) -> Mapping:
    if set(named) != set(input_names):
        raise RequestError(f"inputs {sorted(named)} do not match the signature's "
                           f"{sorted(input_names)}")
    return named


def response_body(outputs: Mapping[str, np.ndarray]) -> dict:
    """{"predictions": [...]}: row i holds every output's i-th entry."""
    rows = len(next(iter(outputs.values())))
    return {"predictions": [{name: _json(name, values[i]) for name, values in outputs.items()}
                            for i in range(rows)]}


def _json(name: str, value):
    if isinstance(value, bytes):
        return ({"b64": base64.b64encode(value).decode()} if name.endswith("_bytes")
                else value.decode())
    if isinstance(value, np.ndarray):
        return [_json(name, item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def predict(signature, body: Mapping) -> dict:
    """Answers a REST body with `signature` (a loaded `serving_default`), as TF Serving's
    predict API would."""
    import tensorflow as tf

    names = list(signature.structured_input_signature[1])
    inputs = request_inputs(body, names)
    outputs = signature(**{name: tf.constant(values) for name, values in inputs.items()})
    return response_body({name: tensor.numpy() for name, tensor in outputs.items()})

"""The flags a manual retraining run may add (`extra_args`): an allowlist.

The deployment fixes where a tick reads and writes (--root, --input, --labels), what it
runs as and where (--project, --service_account_email, --runner, --trainer, images,
Vertex AI settings) and how a candidate is judged (the gate). A manual run may only tune
the training, and may make the gate stricter, never looser:

    --epochs N  --batch_size N  --learning_rate X  --model NAME  --seed N
    --steps_per_execution N  --shuffle_buffer SIZE  --mixed_precision/--jit auto|on|off
    --deterministic  --progress auto|on|off
    --gate_margin X   only X <= the deployment's margin (a larger margin promotes a worse
                      candidate: a bypass of the gate)

Not allowed, for instance: --cache PATH (writes anywhere), --run_id (run ids must sort in
time order), --gate_metric and --block_on_drift (picking the rule is loosening it).

Pure Python without third-party imports, so the scheduler's environment can load it
beside the schedule's file and the project's test suite can test it without one.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable

DEFAULT_GATE_MARGIN = 0.02  # pipelines.retraining.gate.GateRule.margin (a test keeps them equal)
_INT = re.compile(r"[0-9]{1,9}")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_WORD = re.compile(r"[A-Za-z0-9_]{1,64}")
_SIZE = re.compile(r"[0-9]{1,12}(?:\.[0-9]+)?(?:[KkMmGg][Ii]?)?[Bb]?")


class RefusedArgs(ValueError):
    """extra_args holds something a manual run may not set; the message says what."""


def _positive_int(value: str) -> str | None:
    return None if _INT.fullmatch(value) and int(value) >= 1 else "a positive integer"


def _int(value: str) -> str | None:
    return None if _INT.fullmatch(value) else "a non-negative integer"


def _positive_float(value: str) -> str | None:
    if _FLOAT.fullmatch(value) and math.isfinite(float(value)) and float(value) > 0:
        return None
    return "a positive number"


def _word(value: str) -> str | None:
    return None if _WORD.fullmatch(value) else "a name (letters, digits, _)"


def _size(value: str) -> str | None:
    return None if _SIZE.fullmatch(value) else "a size such as 64MB or 256MiB"


def _switch(value: str) -> str | None:
    return None if value in ("auto", "on", "off") else "auto, on or off"


# flag -> what its value must be. The values' own checks (e.g. --model's names) are the
# tick's; these keep every value one plain word.
VALUED: dict[str, Callable[[str], str | None]] = {
    "--epochs": _positive_int,
    "--batch_size": _positive_int,
    "--learning_rate": _positive_float,
    "--model": _word,
    "--seed": _int,
    "--steps_per_execution": _positive_int,
    "--shuffle_buffer": _size,
    "--mixed_precision": _switch,
    "--jit": _switch,
    "--progress": _switch,
}
SWITCHES = ("--deterministic",)  # no value
GATE_MARGIN = "--gate_margin"  # only below the deployment's margin
ALLOWED = (*VALUED, *SWITCHES, GATE_MARGIN)


def gate_margin(deployment_args: str) -> float:
    """The gate margin the deployment's own flags set (the last --gate_margin wins, as in
    argparse), or the tick's default. Split on spaces, as the tick's shell splits them."""
    margin = DEFAULT_GATE_MARGIN
    tokens = deployment_args.split()
    for index, token in enumerate(tokens):
        flag, has_value, value = token.partition("=")
        if flag == GATE_MARGIN:
            text = value if has_value else (tokens[index + 1] if index + 1 < len(tokens)
                                            else "")
            try:
                margin = float(text)
            except ValueError:
                pass  # the tick refuses it with its own message
    return margin


def check_extra_args(extra_args: str, deployment_args: str = "") -> list[str]:
    """A manual run's `extra_args` (shell words) -> its flags as `--flag=value` or
    `--switch` tokens, if every flag is on the allowlist and every value is of its kind.

    `deployment_args` are the deployment's own flags (imagebeam_args): --gate_margin may
    only go below their margin. Raises RefusedArgs naming the first refused token.
    """
    try:
        tokens = shlex.split(extra_args)
    except ValueError as err:
        raise RefusedArgs(f"extra_args {extra_args!r}: {err}") from err
    out: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        flag, has_value, value = token.partition("=")
        if flag not in ALLOWED:
            what = (f"{flag!r} is not a flag a manual run may set" if flag.startswith("-")
                    else f"unexpected {token!r} (not the value of an allowed flag)")
            raise RefusedArgs(f"extra_args: {what}; the deployment fixes the rest. "
                              f"Allowed: {', '.join(sorted(ALLOWED))}")
        if flag in SWITCHES:
            if has_value:
                raise RefusedArgs(f"extra_args: {flag} takes no value")
            out.append(flag)
            index += 1
            continue
        if not has_value:
            if index + 1 >= len(tokens):
                raise RefusedArgs(f"extra_args: {flag} needs a value")
            value = tokens[index + 1]
        problem = (_tighter_margin(value, gate_margin(deployment_args))
                   if flag == GATE_MARGIN else VALUED[flag](value))
        if problem:
            raise RefusedArgs(f"extra_args: {flag} {value!r}: wants {problem}")
        out.append(f"{flag}={value}")  # one word, even for a negative number
        index += 1 if has_value else 2
    return out


def _tighter_margin(value: str, deployment: float) -> str | None:
    if _FLOAT.fullmatch(value) and math.isfinite(float(value)) and float(value) <= deployment:
        return None
    return (f"a number <= the deployment's margin {deployment:g} (a manual run may make the "
            "gate stricter, not looser)")


def allowed_extra_args(extra_args: str, deployment_args: str = "") -> str:
    """`check_extra_args` as one string for the tick's shell (which splits it on spaces:
    every token is a plain word, so it splits into exactly the checked tokens)."""
    return " ".join(check_extra_args(extra_args or "", deployment_args or ""))

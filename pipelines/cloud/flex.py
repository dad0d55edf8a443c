"""The Flex Template launcher's entry point: template parameters -> `pipelines.preprocess`.

deploy/flex_main.py (the image's FLEX_TEMPLATE_PYTHON_PY_FILE) calls `main`. Dataflow's
launcher runs it inside the template image when a job is *launched*, with each template
parameter as `--name=value` and Dataflow's own options (--runner, --project, --region,
--staging_location, --temp_location, ...). So the input is listed, the label vocabulary
fixed and the output claimed at launch time -- unlike a classic template, which freezes
them when it is built. That is why Flex is the template to use for this pipeline.

The parameters and their checks live in deploy/flex_template_metadata.json; a test keeps
that file and the CLI (`pipelines.preprocessing.options`) in step.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipelines.cloud.dataflow import FLEX_LAUNCH_ENV
from pipelines.preprocessing import options as options_lib
from pipelines.preprocessing.options import UsageError

METADATA_RELATIVE_PATH = "deploy/flex_template_metadata.json"
# CLI flags that are no template parameter, and why.
NOT_PARAMETERS = {
    "no_progress": "the progress bar is drawn by local runs only",
}
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off", ""})


def switch_flags(parser: argparse.ArgumentParser | None = None) -> frozenset[str]:
    """Names of the CLI's on/off flags (`overwrite`), which take no value."""
    parser = parser or options_lib._parser()
    return frozenset(
        option.removeprefix("--")
        for action in parser._actions
        if action.nargs == 0 and not isinstance(action, argparse._HelpAction)
        for option in action.option_strings if option.startswith("--")
    )


def launcher_argv(argv: Sequence[str]) -> list[str]:
    """The launcher's argv as the CLI takes it.

    Flex passes every parameter as `--name=value`, on/off ones too (`--overwrite=true`);
    the CLI's switches take no value, so `true` becomes the bare flag and `false` drops it.
    Raises UsageError for any other value of a switch.
    """
    switches = switch_flags()
    translated = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if not (sep and name.startswith("--") and name[2:] in switches):
            translated.append(arg)
        elif value.strip().lower() in _TRUE:
            translated.append(name)
        elif value.strip().lower() not in _FALSE:
            raise UsageError(f"{name} wants true or false, got {value!r}")
    return translated


def main(argv: Sequence[str] | None = None) -> int:
    """Runs preprocess as a Flex Template launch; returns its exit code."""
    os.environ[FLEX_LAUNCH_ENV] = "1"  # see pipelines.cloud.dataflow: no classic-template caveats
    try:
        args = launcher_argv(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pipelines import preprocess  # TensorFlow and Beam load only for a valid command

    return preprocess.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""`imagebeam <command> [flags]`: one command for the project's entry points.

    imagebeam preprocess --input gs://bucket/raw --output gs://bucket/prep
    imagebeam train --data gs://bucket/prep --model_dir gs://bucket/model
    imagebeam <command> --help

Each command is its module's own `main()`, called with `sys.argv` set to the command's
flags, so `imagebeam X ...` behaves exactly like `python -m <module> ...`: the same
flags, output and exit status (preprocess ends the process with `os._exit`, see
`pipelines.preprocess.main`). Only the chosen command's module is imported: TensorFlow
and Beam take seconds to load.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from collections.abc import Sequence

from pipelines.contract.command import CONSOLE_COMMAND

PROG = CONSOLE_COMMAND


@dataclasses.dataclass(frozen=True)
class Command:
    module: str  # `python -m module` runs the same command; its main() takes no arguments
    summary: str  # one line for `imagebeam --help`


# The one table of commands: `imagebeam --help` and the dispatch both read it.
COMMANDS: dict[str, Command] = {
    "preprocess": Command(
        "pipelines.preprocess",
        "raw images -> deduplicated, split TFRecord shards, statistics, manifest.json"),
    "train": Command(
        "trainer.task", "train, evaluate and export a model from a preprocess output"),
    "run": Command(
        "pipelines.run", "preprocess, then train on the result (here or on Vertex AI)"),
    "retrain": Command(
        "pipelines.retrain",
        "one scheduled retraining tick: new images, a candidate model, gate, promote"),
    "predict": Command("pipelines.predict", "images -> a SavedModel's predictions, summary.json"),
    "deploy": Command("pipelines.deploy",
                      "a SavedModel -> a Vertex AI endpoint (Model Registry, canary traffic)"),
}

# Every command's exit statuses, gathered from the modules' run()/main() docstrings.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "done (retrain: also when the candidate was rejected or nothing was new)"),
    (1, "the run failed: a pipeline or training error, over --max_error_rate, no image "
        "written, the output's claim taken over, or a step of run/retrain failed"),
    (2, "usage error, or refused before anything was touched (no Google Cloud credentials "
        "or an endpoint that does not answer, input missing, output not ours or in use)"),
    (130, "stopped by Ctrl-C (run --trainer vertex: only the following stops; the job "
          "goes on)"),
    (143, "stopped by SIGTERM (train checkpoints first); the same command resumes"),
)


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [flags]", "",
             "Raw images -> TFRecord shards, statistics and a trained model.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"{PROG} <command> --help shows the command's flags; each command is also "
              "`python -m MODULE`:"]
    lines += [f"  {name:<{width}}  python -m {command.module}"
              for name, command in COMMANDS.items()]
    lines += ["", "exit status:"]
    lines += [textwrap.fill(meaning, 88, initial_indent=f"  {code:<3}  ",
                            subsequent_indent=" " * 7) for code, meaning in EXIT_CODES]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int | None:
    """`imagebeam` itself; returns (or exits with) the chosen command's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(help_text(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(help_text())
        return 0
    name, flags = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"{PROG}: unknown command {name!r} (choose from {', '.join(COMMANDS)}; "
              f"{PROG} --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(command.module)
    # The modules read their flags from sys.argv, as under `python -m`.
    sys.argv = [f"{PROG} {name}", *flags]
    return module.main()


if __name__ == "__main__":
    sys.exit(main())

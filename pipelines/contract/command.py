"""How a command names itself in its usage and error lines."""

from __future__ import annotations

import sys

CONSOLE_COMMAND = "imagebeam"


def prog(module: str) -> str:
    """`imagebeam <command>` when the console command runs the module (it sets argv[0] so),
    else `python -m <module>`: usage lines show what the user typed."""
    invoked = sys.argv[0] if sys.argv else ""
    if invoked.startswith(CONSOLE_COMMAND + " "):
        return invoked
    return f"python -m {module}"

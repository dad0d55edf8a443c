"""TensorFlow's C++ log lines kept off the terminal where they are noise.

TensorFlow's C++ code writes to file descriptor 2 directly; some lines (start-up, CUDA
probing, grappler's fallbacks when the serving graph is optimised) come before or beside
its logging settings. The trainer sends fd 2 to a temporary file around those steps only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def native_stderr(environ: Mapping[str, str], what: str) -> Iterator[None]:
    """Inside the block, file descriptor 2 (where C++ code writes) goes to a temporary
    file; after it, also on an error, fd 2 is what it was, so a Python traceback raised in
    the block is printed there. The file is removed, or kept and named on stderr when the
    block raises. Python's sys.stderr is flushed at both ends so its lines stay on their
    side. Does nothing when TF_CPP_MIN_LOG_LEVEL is 0 or 1: the user asked to see
    TensorFlow's INFO or WARNING lines."""
    if environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1"):
        yield
        return
    log, path = tempfile.mkstemp(prefix="imagebeam-trainer-", suffix=".log")
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log, 2)
    failed = False
    try:
        yield
    except Exception:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log)
        if failed:
            print(f"[trainer] {what}: {path}", file=sys.stderr)
        else:
            os.remove(path)

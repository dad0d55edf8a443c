"""FLEX_TEMPLATE_PYTHON_PY_FILE of the Dataflow image: the Flex launcher runs this file.

It lives outside the package on purpose: the launcher runs it as a script, which puts its
folder first on sys.path, and pipelines/ holds modules named like the standard library's
(statistics.py).
"""

import sys

from pipelines.cloud.flex import main

if __name__ == "__main__":
    sys.exit(main())

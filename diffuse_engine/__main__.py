"""``python -m diffuse_engine``: the ``diffuse-engine`` command line."""

import sys

from .entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())

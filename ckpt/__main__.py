"""``python -m ckpt``: the ``ckpt`` command line (see :mod:`ckpt.cli`)."""

import sys

from ckpt.cli import main

if __name__ == "__main__":
    sys.exit(main())

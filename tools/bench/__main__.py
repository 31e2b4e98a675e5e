"""``python -m skystack.tools.bench``: the stand-alone benchmark, or ``--one SPEC`` for a child measurement."""

import sys

from skystack.tools.bench.cli import main

sys.exit(main())

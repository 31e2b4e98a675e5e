"""``python -m skystack.tools.bench``: the stand-alone benchmark, or ``--one SPEC`` for a child measurement."""

import sys

from skystack.cli import prepare_process

prepare_process()  # a measured child runs as the skystack command would

from skystack.tools.bench.cli import main  # noqa: E402 - after prepare_process: NumPy loads here

sys.exit(main())

"""``python -m skystack`` entry point."""

import sys

from skystack.cli import main

if __name__ == "__main__":
    sys.exit(main())

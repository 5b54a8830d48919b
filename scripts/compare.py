"""Compare epochs and runs from an MLflow store: `python scripts/compare.py --help`."""

import sys

from dlharness.store.compare import main

if __name__ == "__main__":
    sys.exit(main())

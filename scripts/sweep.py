"""Hyperparameter sweep, trials nested under one MLflow run: `python scripts/sweep.py --help`."""

import sys

from dlharness.sweeps.sweep import main

if __name__ == "__main__":
    sys.exit(main())

"""Train a classifier with every epoch tracked in MLflow: `python scripts/train.py --help`."""

import sys

from dlharness.training.cli import main

if __name__ == "__main__":
    sys.exit(main())

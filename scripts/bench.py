"""Benchmark the cost of tracking: `python scripts/bench.py --help` (writes bench/results.json)."""

import sys

from dlharness.bench import main

if __name__ == "__main__":
    sys.exit(main())

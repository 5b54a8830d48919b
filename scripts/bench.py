"""Benchmark the cost of tracking: `python scripts/bench.py --help` (writes bench/results.json).

The benchmark's code lives beside its results in bench/, outside the installed package.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "bench" / "tracking_cost.py"), run_name="__main__"
    )

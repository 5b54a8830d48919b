"""Per-trial overhead of dlharness-sweep on digits: `python scripts/bench_sweep.py -h`.

The benchmark's code lives beside the other benchmarks in bench/, outside the installed package.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "bench" / "sweep_overhead.py"),
        run_name="__main__",
    )

"""K simulated trainings against one MLflow tracking server: `python scripts/load_server.py -h`.

The load test's code lives beside the other benchmarks in bench/, outside the installed package.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "bench" / "server_load.py"), run_name="__main__"
    )

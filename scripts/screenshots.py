"""The tutorial's screenshots of a real MLflow UI: `make docs`, or `python scripts/screenshots.py`.

The code lives in tools/ (with the page driver the UI test uses), outside the installed package.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "tools" / "screenshots.py"), run_name="__main__"
    )

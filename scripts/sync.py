"""Replay what a run spooled during a tracking outage: `python scripts/sync.py SPOOL_DIR`."""

import sys

from dlharness.store.sync import main

if __name__ == "__main__":
    sys.exit(main())

"""Start MLflow's tracking server for a team (loopback, proxied artifacts): `--help`."""

import sys

from dlharness.store.server import main

if __name__ == "__main__":
    sys.exit(main())

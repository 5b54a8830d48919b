"""Where a run came from: environment, installed packages, source and model description."""

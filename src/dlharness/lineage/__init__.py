"""Where the data came from: DVC data versions, and reproducing a run from its commit and data."""

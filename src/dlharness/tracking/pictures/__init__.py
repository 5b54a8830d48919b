"""Charts, confusion matrices and per-step images a run logs, drawn off the training thread."""

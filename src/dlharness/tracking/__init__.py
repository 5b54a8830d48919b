"""Everything that talks to MLflow: runs, config, models."""

"""dlharness: a PyTorch Lightning training harness whose every epoch is tracked in MLflow."""

__version__ = "0.1.0"

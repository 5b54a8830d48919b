"""Hyperparameter sweeps: an Optuna study whose every trial is a tracked training run."""

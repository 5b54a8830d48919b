"""Lightning callbacks: progress output and the MLflow epoch tracker."""

"""Models that go to work: the served image classifier and its registry lifecycle."""

from __future__ import annotations

from dlharness.serving.classifier_logging import (
    ImagePreprocessing,
    log_classifier,
    pinned,
    quiet_any_type_hint,
)

__all__ = ["ImagePreprocessing", "log_classifier", "pinned", "quiet_any_type_hint"]

"""The end-of-run evaluation's ROC curves agree with scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from dlharness.training.evaluation import roc_curve


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [2, 6])  # many tied scores, and few
def test_roc_curve_matches_scikit_learn(seed, decimals):
    rng = np.random.default_rng(seed)
    positives = rng.random(300) < 0.2
    # Scores that lean towards the positives, as a trained classifier's do.
    scores = np.round(rng.random(300) * 0.7 + 0.3 * positives, decimals)
    fpr, tpr, auc = roc_curve(positives, scores)
    expected_fpr, expected_tpr, _ = sklearn_roc_curve(positives, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, expected_tpr, rtol=0, atol=1e-15)
    assert auc == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
    assert 0.5 < auc < 1.0

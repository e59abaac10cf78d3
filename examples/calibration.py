r"""Expected calibration error (ECE) of predicted class probabilities.

Guo et al., "On Calibration of Modern Neural Networks", ICML 2017: the predictions are
binned by their confidence :math:`\hat p_i = \max_k p_{ik}` into ``n_bins`` equal-width bins
of :math:`(0, 1]`, and

.. math::

    \mathrm{ECE} = \sum_{b} \frac{|B_b|}{n} \left| \operatorname{acc}(B_b) -
    \operatorname{conf}(B_b) \right|,

the gap between accuracy and mean confidence, weighted by the bins' sizes (15 bins, as
there and in the bSAM paper's tables). 0 is perfectly calibrated.
"""

from __future__ import annotations

import numpy as np

__all__ = ["expected_calibration_error"]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of ``probs`` (``(n, classes)``, rows summing to 1) against integer ``labels``."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(
            f"probs must be (n, classes) and labels (n,), got {probs.shape} and {labels.shape}"
        )
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    if probs.shape[0] == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bin b holds confidences in (b / n_bins, (b + 1) / n_bins]; a confidence of 0 goes to bin 0.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)

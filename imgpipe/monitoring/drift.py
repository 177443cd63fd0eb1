"""Two-sample tests of served traffic against a version's reference profile.

- **Embedding drift**: the maximum mean discrepancy (MMD, Gretton et al. 2012) between the
  reference's and the traffic's embeddings, with a Gaussian kernel whose width is the median
  pairwise distance of the pooled sample, and its p-value by permutation. Alibi Detect has the
  same test, but its releases pin TensorFlow below the version this project runs, so it is
  written here on numpy: every permutation is one column of a matrix product.
- **Prediction drift**: the predicted classes (chi-square test of the two count rows) and the
  top-1 confidence (two-sample Kolmogorov-Smirnov), from scipy.

    result = mmd_test(reference.embeddings, traffic, permutations=1000, seed=0)
    result.p_value < 0.01  # drift
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TestResult:
    statistic: float
    p_value: float


def _squared_distances(x: np.ndarray) -> np.ndarray:
    norms = np.einsum("ij,ij->i", x, x)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * x @ x.T, 0.0)


def mmd_test(
    reference: np.ndarray, sample: np.ndarray, *, permutations: int, seed: int
) -> TestResult:
    """The (biased) squared MMD between ``reference`` (n, d) and ``sample`` (m, d) and its
    permutation p-value, ``(1 + #{permuted >= observed}) / (1 + permutations)``."""
    x, y = np.asarray(reference, np.float64), np.asarray(sample, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"two samples of >= 2 rows and equal width, got {x.shape} and {y.shape}")
    pooled = np.concatenate([x, y])
    distances = _squared_distances(pooled)
    width = np.median(distances[np.triu_indices(len(pooled), 1)])
    kernel = np.exp(-distances / max(width, 1e-12))
    n, m = len(x), len(y)
    signs = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    rng = np.random.default_rng(seed)
    columns = np.stack([signs] + [rng.permutation(signs) for _ in range(permutations)], axis=1)
    statistics = np.einsum("ij,ij->j", columns, kernel @ columns)
    observed = statistics[0]
    p_value = (1 + int(np.sum(statistics[1:] >= observed))) / (1 + permutations)
    return TestResult(float(observed), float(p_value))


def predicted_counts(probabilities: np.ndarray, classes: int) -> np.ndarray:
    """How often each class is the argmax of a row of ``probabilities``."""
    return np.bincount(np.argmax(probabilities, axis=1), minlength=classes)


def class_test(reference: np.ndarray, sample: np.ndarray, classes: int) -> TestResult:
    """Chi-square test that the predicted classes (argmax of each row of probabilities) of the
    two samples come from one distribution (classes neither predicts are left out)."""
    from scipy.stats import chi2_contingency

    counts = np.stack([predicted_counts(p, classes) for p in (reference, sample)])
    counts = counts[:, counts.sum(axis=0) > 0]
    if counts.shape[1] < 2:
        return TestResult(0.0, 1.0)  # one class predicted by both: nothing to compare
    result = chi2_contingency(counts)
    return TestResult(float(result.statistic), float(result.pvalue))


def confidence_test(reference: np.ndarray, sample: np.ndarray) -> TestResult:
    """Kolmogorov-Smirnov test of the top-1 probabilities of the two samples."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.max(reference, axis=1), np.max(sample, axis=1))
    return TestResult(float(result.statistic), float(result.pvalue))

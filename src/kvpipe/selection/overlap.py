"""Selection budgets and scout/main overlap against its exact random expectation.

Budget: with `selection.budget: context` a retention r keeps k = round(r · n) of the n context
tokens; with `prompt` (as kvpress counts it) r applies to the whole pre-question prompt, template
prefix p included, and since the template is always kept the context keeps k = round(r · (p + n)) − p.
Either way 1 ≤ k ≤ n.

Null: a method may always keep some positions whatever the model (SnapKV's kept observation
window); they depend only on (n, k), so scout and main share them. Two selections of k of n
positions that share f forced positions and pick the other k − f uniformly from the n − f
others overlap in f + X positions, X ~ Hypergeometric(n − f, k − f, k − f). Hence
E|A∩B| = f + (k − f)² / (n − f), and E[Jaccard] = E[(f + X) / (2k − f − X)], both exact.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import hypergeom

BUDGETS = ("context", "prompt")


def context_budget(retention: float, n_context: int, prefix: int = 0, budget: str = "context") -> int:
    """Context tokens kept at a retention, counting the context alone or the prefix plus the context."""
    if budget == "prompt":
        return int(min(n_context, max(1, round(retention * (prefix + n_context)) - prefix)))
    return int(max(1, round(retention * n_context)))


def random_overlap(n: int, k: int, forced: int = 0) -> tuple[float, float]:
    """Exact expected overlap |A∩B|/k and Jaccard of two random k-of-n selections sharing `forced` positions."""
    free, picks = n - forced, k - forced
    if picks <= 0 or free <= picks:
        return 1.0, 1.0
    x = np.arange(picks + 1)
    pmf = hypergeom(free, picks, picks).pmf(x)
    inter = forced + x
    return float(pmf @ inter / k), float(pmf @ (inter / (2 * k - inter)))


def overlap_row(a: np.ndarray, b: np.ndarray, n: int, forced: int = 0) -> dict[str, float]:
    """Overlap of two equal-size selections of n candidates, with the random expectation given `forced` shared positions."""
    k, inter = len(a), len(np.intersect1d(a, b))
    overlap_random, jaccard_random = random_overlap(n, k, forced)
    return {"overlap": inter / k, "jaccard": inter / (2 * k - inter), "overlap_random": overlap_random,
            "jaccard_random": jaccard_random, "n_forced": forced}

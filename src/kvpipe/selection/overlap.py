"""Scout/main selection overlap against its exact random expectation (budgets: kvpipe.scoring.select).

Null: a method may always keep some positions whatever the model (SnapKV's kept observation
window); they depend only on (n, k), so scout and main share them. Two selections of k of n
positions that share f forced positions and pick the other k − f uniformly from the n − f
others overlap in f + X positions, X ~ Hypergeometric(n − f, k − f, k − f). Hence
E|A∩B| = f + (k − f)² / (n − f), and E[Jaccard] = E[(f + X) / (2k − f − X)], both exact.

Across tokenizers (kvpipe.alignment) the token-space overlap compares, in the main's tokens, the
scout's selection mapped to them with the main's own; its null is the one above with the main's
n, k and forced positions. The character-space overlap is the share of the main's kept context
characters that the scout's own selection keeps too. Its null holds the main's selection fixed and
lets the scout keep its forced tokens plus k_s − f_s of its other n_s − f_s tokens uniformly: a
character c that m_c of those free tokens cover is kept with probability 1 − P(X = 0),
X ~ Hypergeometric(n_s − f_s, m_c, k_s − f_s) (1 if a forced token covers it), so the expected
share is the mean of that probability over the main's kept characters, exact.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import hypergeom


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


def _coverage(spans: np.ndarray, length: int) -> np.ndarray:
    """How many of the [start, end) spans cover each character 0..length-1 (spans covering nothing skipped)."""
    spans = spans[(spans[:, 0] >= 0) & (spans[:, 1] > spans[:, 0])]
    edges = np.zeros(length + 1, np.int64)
    np.add.at(edges, spans[:, 0], 1)
    np.add.at(edges, spans[:, 1], -1)
    return np.cumsum(edges)[:length]


def character_overlap(scout_spans: np.ndarray, scout_kept: np.ndarray, scout_forced: np.ndarray,
                      main_spans: np.ndarray, main_kept: np.ndarray) -> dict[str, float]:
    """Share of the main's kept context characters that the scout's selection keeps, and its random expectation
    (module docstring); spans are each model's context-token character spans, selections index them."""
    length = int(max(scout_spans[:, 1].max(), main_spans[:, 1].max()))
    main_chars = _coverage(main_spans[main_kept], length) > 0
    scout_chars = _coverage(scout_spans[scout_kept], length) > 0
    forced = _coverage(scout_spans[scout_forced], length) > 0
    free = np.setdiff1d(np.arange(len(scout_spans)), scout_forced)
    covering = _coverage(scout_spans[free], length)[main_chars]
    picks = len(scout_kept) - len(scout_forced)
    kept = np.where(forced[main_chars], 1.0, 1.0 - hypergeom(len(free), covering, picks).pmf(0))
    return {"char_overlap": float((main_chars & scout_chars).sum() / main_chars.sum()),
            "char_overlap_random": float(kept.mean())}

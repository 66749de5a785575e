"""The verdict vocabulary: equivalence only by TOST, better / worse only when the interval excludes 0."""

from __future__ import annotations

import numpy as np
import pytest

from kvpipe.estimands import BETTER, EQUIVALENT, UNDECIDED, WORSE, Comparison, carries_content, compare
from kvpipe.stats import cluster_bootstrap_counts


def _paired(n_passages: int, shift: float, seed: int) -> tuple[float, np.ndarray]:
    """A planted paired F1 difference on n passages (two questions each): point estimate and passage replicates."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, 2 * n_passages)
    b = a - shift + rng.normal(0, 0.4, a.shape)   # per-question differences as large as F1's 0/1 jumps
    d = a - b
    counts = cluster_bootstrap_counts(np.repeat(np.arange(n_passages), 2), 1000, seed)
    return float(d.mean()), counts @ d / counts.sum(1)


@pytest.mark.parametrize(("n", "shift", "verdict"), [
    (2000, 0.0, EQUIVALENT),    # planted equal, large n: the 90 % interval lies inside ±0.05
    (2000, 0.2, BETTER),        # planted different: a − b = +0.2
    (2000, -0.2, WORSE),
    (10, 0.0, UNDECIDED),       # planted equal, small n: neither different nor shown equivalent
])
def test_tost_words_planted_pairs(n, shift, verdict):
    c = compare(*_paired(n, shift, seed=n), level=0.95, margin=0.05)
    assert c.verdict == verdict, c
    assert c.tost_low >= c.low and c.tost_high <= c.high   # the 1 − 2α interval lies inside the 1 − α one
    assert c.detectable == pytest.approx(1.959964 * np.std(_paired(n, shift, seed=n)[1], ddof=1), rel=1e-6)


def test_a_small_real_difference_is_not_called_equivalent():
    """A difference of 0.08 that the data show clearly is 'worse', never 'equivalent' within a 0.05 margin."""
    c = compare(*_paired(2000, -0.08, seed=1), level=0.95, margin=0.05)
    assert c.verdict == WORSE and "worse than main_full" in c.words("main_full")


def test_words_name_the_estimand_and_the_detectable_size():
    c = compare(*_paired(10, 0.0, seed=3), level=0.95, margin=0.05)
    text = c.words("main_full")
    assert text.startswith("undecided against main_full at this n (detectable |Δ| ≈") and "answerable F1" in text
    assert "TOST" in compare(*_paired(2000, 0.0, seed=2000), 0.95, 0.05).words("main_full")


def test_a_difference_inside_the_margin_is_equivalent_even_when_it_excludes_0():
    c = compare(*_paired(2000, -0.015, seed=5), level=0.95, margin=0.05)
    assert c.high < 0 and c.verdict == EQUIVALENT


def test_carries_content_needs_every_floor_beaten():
    def made(verdict: str) -> Comparison:
        return Comparison("answerable F1", 0.1, 0.05, 0.15, 0.06, 0.14, 0.01, 0.05, 0.05, verdict)

    assert carries_content([made(BETTER), made(BETTER)])
    assert not carries_content([made(BETTER), made(UNDECIDED)]) and not carries_content([])

import numpy as np
import pandas as pd
import pytest

from kvpipe.scoring.methods import SnapKV
from kvpipe.scoring.select import context_budget
from kvpipe.selection.aggregate import aggregate
from kvpipe.selection.overlap import overlap_row, random_overlap
from kvpipe.selection.report import summary_markdown
from kvpipe.settings import SelectionSettings, recorded
from kvpipe.stats import holm


def test_snapkv_null_is_one_when_the_window_fills_the_budget():
    n, k = 120, 30                                            # 25 % of a short context, window 32
    forced = SnapKV(window=32, max_window_fraction=1.0).forced_positions(n, k)
    assert forced.tolist() == list(range(90, 120))            # the whole budget is the window
    row = overlap_row(np.arange(90, 120), np.arange(90, 120), n, len(forced))
    assert row["overlap_random"] == 1.0 and row["jaccard_random"] == 1.0   # k/n would say 0.25
    f = len(SnapKV(window=32).forced_positions(n, k))         # default rule: at most half the budget
    assert f == 15
    assert overlap_row(np.arange(k), np.arange(k), n, f)["overlap_random"] == pytest.approx((f + (k - f) ** 2 / (n - f)) / k)


def test_snapkv_window_rule():
    snap = SnapKV(window=32, max_window_fraction=0.5)
    assert snap.plan(120, None, 32) == (32, 32)              # no budget: the configured window, as before
    assert snap.plan(120, 30, 32) == (15, 15)                # at most half of the budget
    assert snap.plan(1000, 200, 32) == (32, 32)              # long contexts: the configured window
    assert snap.plan(10, 1, 32) == (1, 0)                    # one observation row, nothing forced
    for k in range(1, 120):
        w, forced = snap.plan(120, k, 32)
        assert 1 <= w <= 32 and forced <= 0.5 * k and len(snap.forced_positions(120, k)) == forced
    assert SnapKV(keep_window=False).plan(120, 30, 32)[1] == 0
    aware = SnapKV(window=8, protocol="query_aware")
    assert aware.plan(120, 30, 5) == (5, 0) and len(aware.forced_positions(120, 30)) == 0


def test_random_overlap_is_exact():
    n, k, f = 20, 8, 3
    rng = np.random.default_rng(0)
    inter, jac = [], []
    for _ in range(20000):
        a = np.r_[np.arange(f), f + rng.choice(n - f, k - f, replace=False)]
        b = np.r_[np.arange(f), f + rng.choice(n - f, k - f, replace=False)]
        i = len(np.intersect1d(a, b))
        inter.append(i / k)
        jac.append(i / (2 * k - i))
    overlap, jaccard = random_overlap(n, k, f)
    assert overlap == pytest.approx((f + (k - f) ** 2 / (n - f)) / k)
    assert overlap == pytest.approx(np.mean(inter), abs=0.005) and jaccard == pytest.approx(np.mean(jac), abs=0.005)
    assert random_overlap(40, 10)[0] == pytest.approx(10 / 40)


def test_context_budget():
    assert context_budget(0.5, 100) == 50 and context_budget(0.001, 100) == 1
    assert context_budget(0.5, 100, prefix=20, budget="prompt") == 40      # 60 of 120 prompt tokens, 20 of them template
    assert context_budget(0.1, 100, prefix=20, budget="prompt") == 1       # the template alone exceeds the budget
    assert context_budget(1.0, 100, prefix=20, budget="prompt") == 100


def _answers(n=12):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        base = {"sample_idx": i, "passage": f"p{i}", "is_impossible": i % 3 == 0, "n_context": 100, "n_template": 20,
                "prediction": "x", "abstained": False, "empty": False}
        for role in ("scout", "main"):
            rows.append(base | {"role": role, "method": "full", "retention": 1.0, "source": "none", "f1": 1.0,
                                "exact": 1.0, "retention_context": 1.0, "retention_prompt": 1.0})
            for method, src, f1 in (("q2c", "own", 0.9), ("q2c", "transfer", 0.1), ("random", "own", 0.5)):
                rows.append(base | {"role": role, "method": method, "retention": 0.5, "source": src,
                                    "f1": f1 + 0.05 * rng.standard_normal(), "exact": 0.0,
                                    "retention_context": 0.5, "retention_prompt": 0.6})
    overlaps = pd.DataFrame([{"sample_idx": i, "method": "q2c", "retention": 0.5, "overlap": 0.6, "jaccard": 0.4,
                              "spearman": 0.5, "overlap_random": 0.5, "jaccard_random": 0.33} for i in range(n)])
    return pd.DataFrame(rows), overlaps


def test_family_is_holm_corrected_and_the_summary_says_what_survives():
    answers, overlaps = _answers()
    cfg = {"bootstrap": 200, "ci": 0.95, "seed": 0, "methods": ["q2c", "random"], "budget": "context",
           "max_new_tokens": 4, "max_samples": None}
    agg = aggregate(answers, overlaps, recorded(SelectionSettings, "selection", cfg), 0.05)
    family = agg[agg["p_value"].notna()]
    assert set(family["quantity"]) == {"delta_forward", "delta_reverse", "delta_own_vs_random", "delta_own_vs_full"}
    assert len(family) == 6 and (family["table"] == "transfer").all()
    np.testing.assert_allclose(family["p_holm"], holm(family["p_value"]))
    assert (family["p_holm"] < 0.05).all()                     # every delta here is large for n = 12
    detectable = agg[agg["quantity"] == "detectable_forward"]
    assert sorted(detectable["table"]) == ["transfer", "transfer_all"]   # answerable (the estimand), every question
    assert (detectable["value"] > 0).all()
    assert {"transfer_all", "abstention", "overlap_answerable", "overlap_unanswerable"} <= set(agg["table"])
    assert (family["verdict"] != "").all()
    facts = {"pair": "p", "scout": "s", "main": "m", "selection": cfg, "n_sampled": 12}
    text = summary_markdown(agg, answers, facts, "d", 0.05)
    sections = ("## Full-KV answers beside the floors", "## Retention kept", "## Multiple comparisons")
    assert text.index(sections[0]) < text.index(sections[1]) < text.index(sections[2])
    assert "smallest forward delta distinguishable from 0 is about ±" in text and "Holm" in text
    assert "| main | q2c | 0.50 | delta_forward |" in text and "## Every question (all-question F1" in text
    assert "| 0.50 | 0.500 (0.500–0.500) | 0.600 (0.600–0.600) |" in text

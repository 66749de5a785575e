import numpy as np
import pytest

from kvpipe.stats import bootstrap_pvalue, cluster_bootstrap_counts, cluster_codes, cluster_halves, holm


def test_holm_on_a_known_family():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])   # capped at 1
    np.testing.assert_allclose(holm([0.2]), [0.2])             # a family of one is unadjusted
    out = holm([0.5, np.nan, 0.01])
    assert np.isnan(out[1]) and out[0] == 0.5 and out[2] == pytest.approx(0.02)   # NaN is outside the family
    np.testing.assert_allclose(holm([0.02, 0.03]), [0.04, 0.04])   # monotone in the sorted order


def test_bootstrap_pvalue_is_small_only_when_replicates_avoid_zero():
    r = np.random.default_rng(0)
    away, around = r.normal(5, 1, size=(999, 1)), r.normal(0, 1, size=(999, 1))
    assert bootstrap_pvalue(away, [5.0])[0] < 1e-5 < 2 / 1000   # about 2 Φ(-5): finer than 2 / (B + 1)
    assert bootstrap_pvalue(around, [0.1])[0] > 0.5
    assert bootstrap_pvalue(np.zeros((10, 2)), [0.0, 0.3]).tolist() == [1.0, 0.0]
    reps = np.random.default_rng(0).normal(0.0, 0.1, 100000)
    assert bootstrap_pvalue(reps, 0.196) == pytest.approx(0.05, abs=0.002)      # 1.96 standard errors from 0
    assert bootstrap_pvalue(reps, -0.196) == bootstrap_pvalue(reps, 0.196) and bootstrap_pvalue(reps, 0.0) == 1.0


def test_cluster_bootstrap_resamples_whole_passages():
    passages = np.array(["b", "a", "b", "c", "a", "b"])
    codes, k = cluster_codes(passages)
    assert k == 3 and codes.tolist() == [1, 0, 1, 2, 0, 1]
    counts = cluster_bootstrap_counts(passages, 500, seed=1)
    assert counts.shape == (500, 6)
    for members in ([1, 4], [0, 2, 5]):                      # members of one passage are drawn together
        assert (counts[:, members] == counts[:, members[:1]]).all()
    assert (counts[:, [1, 0, 3]].sum(1) == 3).all()          # each resample draws k passages
    np.testing.assert_array_equal(counts, cluster_bootstrap_counts(passages, 500, seed=1))


def test_cluster_halves_keep_passages_whole():
    passages = np.repeat(np.arange(10), 3)
    for mask in cluster_halves(passages, 20, seed=0):
        assert mask.sum() == 15 and (mask.reshape(10, 3).all(1) | ~mask.reshape(10, 3).any(1)).all()


def test_one_critical_value_for_every_level():
    """No level falls back to 1.96: 0.8, 0.9, 0.95 and 0.99 each get their own z."""
    from kvpipe.stats import critical_value

    assert [round(critical_value(level), 3) for level in (0.8, 0.9, 0.95, 0.99)] == [1.282, 1.645, 1.96, 2.576]
    with pytest.raises(ValueError):
        critical_value(1.0)


def test_passage_bootstrap_pairs_by_sample_resamples_passages_and_skips_missing_values():
    import pandas as pd

    from kvpipe.stats import PassageBootstrap

    passages = pd.Series(["a", "a", "b", "c", "c", "c"], index=[5, 4, 3, 2, 1, 0])   # indexed by sample_idx
    boot = PassageBootstrap(passages, 400, 0.9, seed=2)
    assert boot.samples.tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(boot.counts, cluster_bootstrap_counts(["c", "c", "c", "b", "a", "a"], 400, 2))
    r = np.random.default_rng(0)
    a, b = pd.Series(r.random(6), index=range(6)), pd.Series(r.random(6), index=range(6))
    point, reps = boot.replicates(a - b)
    assert point == pytest.approx((a - b).mean())
    np.testing.assert_allclose(reps, boot.replicates(a)[1] - boot.replicates(b)[1])   # paired: the same draws
    assert boot.delta(a, b) == boot.mean(a - b) and boot.mean(a)[1] < a.mean() < boot.mean(a)[2]
    by_passage = pd.Series([1.0, 1.0, 1.0, 5.0, 9.0, 9.0], index=range(6))   # constant within each passage
    assert set(np.round(boot.replicates(by_passage)[1], 9)) <= {round((3 * i + 5 * j + 18 * k) / (3 * i + j + 2 * k), 9)
                                                                  for i in range(4) for j in range(4) for k in range(4)
                                                                  if i + j + k == 3}
    holed = a.copy()
    holed[2] = np.nan   # a missing value weighs nothing, in the mean and in every replicate
    assert boot.replicates(holed)[0] == pytest.approx(a.drop(2).mean())
    sub = boot.subset([0, 1, 2])
    assert sub.counts.shape == (400, 3) and (sub.counts.sum(1) == 3).all()   # one passage, drawn afresh

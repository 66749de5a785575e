import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy.stats import ortho_group

from kvpipe.alignment import Alignment
from kvpipe.errors import KvpipeError
from kvpipe.io import read_json
from kvpipe.kv import extract as ex
from kvpipe.kv import store as kvstore
from kvpipe.kv.pairs import KINDS, ShardRows, relative_depth
from kvpipe.linalg import ridge
from kvpipe.linalg.cca import fit_cca, held_out_correlations, mean_correlation, unit_sums
from kvpipe.linalg.ridge import (
    RidgeStats,
    choose_alpha,
    dim_scores,
    fit_ridge,
    mean_map,
    metrics_from_scores,
    pooled,
    r2_per_dim,
    row_scores,
    squared_error,
)
from kvpipe.structure.cka import linear_cka
from kvpipe.structure.position import rope_basis
from kvpipe.structure.report import FIGURES, write_report
from kvpipe.structure.stage import _Run, analyse_pair, run_structure
from kvpipe.structure.summary import summary_markdown

rng = np.random.default_rng(0)
EXTRACTION = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 4, "compression": "none"}


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_rotation_scaling_and_shift(debiased):
    X = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    Q = ortho_group.rvs(16, random_state=1)
    assert linear_cka(X, 3.7 * X @ Q + 5.0, debiased) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(X, rng.normal(size=(200, 16)), debiased) < 0.5


def test_debiased_cka_of_independent_matrices_is_near_zero_when_n_below_d():
    n, d = 40, 400
    biased, debiased = [], []
    for seed in range(20):
        r = np.random.default_rng(seed)
        X, Y = r.normal(size=(n, d)), r.normal(size=(n, d))
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert min(biased) > 0.8          # biased CKA is high for any such matrices
    assert abs(np.mean(debiased)) < 0.015 and max(map(abs, debiased)) < 0.12  # sd ≈ 1/n


def test_cka_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(np.zeros((5, 3)), np.zeros((6, 3)))


def _planted(n=3000, p=12, q=8, noise=0.0, seed=0):
    r = np.random.default_rng(seed)
    W, b = r.normal(size=(p, q)), r.normal(size=q) * 10
    X = r.normal(size=(n, p)) + 4.0
    return X, X @ W + b + noise * r.normal(size=(n, q)), W, b


def test_ridge_from_chunked_statistics_recovers_a_planted_map():
    X, Y, W, b = _planted()
    stats = RidgeStats(12, 8)
    for chunk in np.array_split(np.arange(len(X)), 7):  # shard by shard
        stats.add(X[chunk], Y[chunk])
    m = fit_ridge(stats, alpha=1e-8)
    np.testing.assert_allclose(m.W, W, atol=1e-6)
    np.testing.assert_allclose(m.b, b, atol=1e-5)
    assert squared_error(m, stats) == pytest.approx(0.0, abs=1e-6)


def test_squared_error_from_statistics_matches_rows_and_cv_prefers_weak_penalty():
    X, Y, _, _ = _planted(noise=0.5)
    folds = [RidgeStats(12, 8) for _ in range(3)]
    for k, chunk in enumerate(np.array_split(np.arange(len(X)), 3)):
        folds[k].add(X[chunk], Y[chunk])
    m = fit_ridge(folds[0] + folds[1], alpha=3.0)
    direct = np.sum((m.predict(X[2000:]) - Y[2000:]) ** 2)
    assert squared_error(m, folds[2]) == pytest.approx(direct, rel=1e-9)
    grid = np.array([1e-6, 1e-2, 1e2, 1e4])
    assert choose_alpha(folds, grid) < 1e2 * np.var(X)  # a planted linear map needs little shrinkage


def test_mean_predictor_r2_is_zero_and_a_perfect_map_is_one():
    X, Y, _, _ = _planted(noise=0.1)
    stats = RidgeStats(12, 8)
    stats.add(X[:1500], Y[:1500])
    mean = mean_map(stats)
    groups = [slice(None), slice(0, 4), slice(4, 8)]
    test = Y[1500:]
    r_mean = metrics_from_scores(row_scores(mean.predict(X[1500:]), test, mean.b, groups), len(test))
    np.testing.assert_allclose(r_mean["r2"], 0.0, atol=1e-12)
    r_self = metrics_from_scores(row_scores(test, test, mean.b, groups), len(test))
    np.testing.assert_allclose(r_self["r2"], 1.0)
    np.testing.assert_allclose(r_self["cosine"], 1.0)
    # a shared offset inflates the cosine of the mean predictor: the trap centred R² exposes
    assert r_mean["cosine"][0] > 0.9


def test_per_dimension_r2_is_not_dominated_by_one_high_variance_channel():
    """One predictable channel of 16 with 30x the sd: pooled R² is high, the per-dimension mean is low."""
    r = np.random.default_rng(3)
    X = r.normal(size=(4000, 4))
    Y = r.normal(size=(4000, 16))
    Y[:, 0] = 30 * X[:, 0]
    stats = RidgeStats(4, 16)
    stats.add(X[:2000], Y[:2000])
    m = fit_ridge(stats, 1e-6)
    Y_hat, test = m.predict(X[2000:]), Y[2000:]
    pooled_r2 = metrics_from_scores(row_scores(Y_hat, test, m.b, [slice(None)]), 2000)["r2"][0]
    split = np.array_split(np.arange(2000), 5)  # additive over samples: sums of per-sample dim_scores
    summed = sum(dim_scores(Y_hat[rows], test[rows], m.b) for rows in split)
    per_dim = r2_per_dim(summed, [slice(None), slice(0, 8), slice(8, 16)])
    assert pooled_r2 > 0.95
    assert per_dim[0] < 0.1 and per_dim[0] == pytest.approx(1 / 16, abs=0.02)
    assert per_dim[1] == pytest.approx(1 / 8, abs=0.03) and abs(per_dim[2]) < 0.02


def test_cv_scales_alpha_by_the_training_folds_only(monkeypatch):
    """The held-out fold's rows never set the scale of the α grid it is scored with."""
    X, Y, _, _ = _planted(noise=0.5)
    X = X.copy()
    X[2000:] *= 100  # the third fold's features dominate any scale they enter
    chunks = np.array_split(np.arange(len(X)), 3)
    folds = [RidgeStats(12, 8) for _ in chunks]
    for f, chunk in zip(folds, chunks):
        f.add(X[chunk], Y[chunk])
    calls, real = [], ridge.fit_ridge
    monkeypatch.setattr(ridge, "fit_ridge", lambda stats, alpha: calls.append(alpha) or real(stats, alpha))
    alpha = choose_alpha(folds, np.array([1.0]))

    def scatter(rows):
        return float(((X[rows] - X[rows].mean(0)) ** 2).sum()) / X.shape[1]

    for k, used in enumerate(calls):
        train = np.concatenate([c for j, c in enumerate(chunks) if j != k])
        assert used == pytest.approx(scatter(train), rel=1e-9)
    assert alpha == pytest.approx(scatter(np.arange(len(X))), rel=1e-9)
    assert pooled(folds).n == len(X)


def _cca_scores(X, Y, top, seed=0):
    """Fit CCA on the first half from chunked statistics; (test score, shuffled-null score, per-pair test corr)."""
    half, r = len(X) // 2, np.random.default_rng(seed)
    xy, yy = RidgeStats(X.shape[1], Y.shape[1]), RidgeStats(Y.shape[1], Y.shape[1])
    for chunk in np.array_split(np.arange(half), 5):  # shard by shard
        xy.add(X[chunk], Y[chunk])
        yy.add(Y[chunk], Y[chunk])
    cmap = fit_cca(xy, yy, components=8, regularisation=1e-3, top=top)
    Xt, Yt = X[half:], Y[half:]
    units = np.arange(len(Xt)) // 50  # 50 rows per test passage
    true = unit_sums(cmap, Xt, Yt, units, units.max() + 1)
    null = unit_sums(cmap, Xt, Yt[r.permutation(len(Yt))], units, units.max() + 1)
    U, V = cmap.project(Xt, Yt)
    direct = [np.corrcoef(U[:, i], V[:, i])[0, 1] for i in range(top)]
    np.testing.assert_allclose(held_out_correlations(true.sum(0), len(Xt)), direct, atol=1e-9)  # sums add up
    return mean_correlation(true.sum(0), len(Xt)), mean_correlation(null.sum(0), len(Xt)), np.array(direct)


def test_cca_finds_a_planted_shared_signal_and_its_shuffled_null_is_near_zero():
    """Y = X A + noise, A reading X's 3 leading dims only: the top 3 canonical correlations on test are near 1, the
    rest near 0, and the shuffled-pairing null near 0."""
    r = np.random.default_rng(5)
    X = r.normal(size=(6000, 24)) * np.r_[[3.0, 2.5, 2.0], np.linspace(1, 0.5, 21)]
    A = np.zeros((24, 16))
    A[:3] = r.normal(size=(3, 16))
    Y = X @ A + 0.3 * r.normal(size=(6000, 16))
    score, null, per_pair = _cca_scores(X, Y, top=3)
    assert score > 0.98 and (per_pair > 0.97).all()
    assert abs(null) < 0.05
    assert _cca_scores(X, Y, top=5)[2][3:].max() < 0.15   # beyond the shared signal: noise


def test_cca_of_an_unrelated_pair_is_at_the_null():
    r = np.random.default_rng(6)
    X, Y = r.normal(size=(6000, 24)) * np.linspace(3, 0.5, 24), r.normal(size=(6000, 16)) @ r.normal(size=(16, 16))
    score, null, _ = _cca_scores(X, Y, top=3)
    assert abs(score) < 0.05 and abs(score - null) < 0.06


def test_rope_basis_recovers_the_rotation_of_each_position():
    torch = pytest.importorskip("torch")
    from kvpipe.models.rope import apply_rope

    d, heads, positions = 8, 3, torch.arange(50, dtype=torch.float32)
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(positions, inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    pre = torch.randn(heads, 50, d, generator=torch.Generator().manual_seed(0))
    post = apply_rope(pre, cos, sin)
    rows = lambda t: t.permute(1, 0, 2).reshape(50, heads * d).double().numpy()  # noqa: E731  head-major rows
    basis = rope_basis(rows(post), rows(pre), d)
    np.testing.assert_allclose(basis, torch.cat([angles.cos(), angles.sin()], -1).numpy(), atol=1e-5)


def test_relative_depth_alignment():
    assert relative_depth(24, 28)[0] == (0, 0) and relative_depth(24, 28)[-1] == (23, 27)
    assert relative_depth(2, 3) == [(0, 0), (1, 2)]
    assert [m for _, m in relative_depth(3, 3)] == [0, 1, 2]


def _passages(samples: pd.DataFrame) -> np.ndarray:
    """Passage id per sample_idx."""
    return samples.sort_values("sample_idx")["passage"].to_numpy()


@pytest.fixture(scope="module")
def kv_dirs(tmp_path_factory, model_dirs, samples_path, smoke_config):
    root = tmp_path_factory.mktemp("kvs")
    out = {}
    for slug in ("tiny-scout", "tiny-main", "tiny-llama"):
        ex.extract(model_dirs[slug], samples_path, root / slug, EXTRACTION, smoke_config["prompt"], "cpu")
        out[slug] = root / slug
    for slug in ("tiny-scout", "tiny-main"):
        ex.extract(model_dirs[slug], samples_path, root / f"{slug}-by2", EXTRACTION | {"shard_size": 2},
                   smoke_config["prompt"], "cpu")
        out[f"{slug}-by2"] = root / f"{slug}-by2"
    return out


def _cfg(smoke_config, **kw):
    alignment = {"pool": smoke_config["alignment"]["pool"]}   # what the rule passes (workflow/rules/structure.smk)
    return smoke_config["structure"] | {"calibration_fraction": 0.5, "cv_folds": 2, "alignment": alignment} | kw


def test_model_paired_with_itself_gives_r2_and_cka_near_one(kv_dirs, samples, smoke_config):
    table, facts = analyse_pair(kv_dirs["tiny-main"], kv_dirs["tiny-main"], _passages(samples), "self",
                                _cfg(smoke_config))
    assert facts["aligned_layers"] == [(0, 0), (1, 1), (2, 2)]
    fitted = table[(table["baseline"] == "none") & (table["metric"] == "r2") & table["kind"].isin(ex.kvstore.KINDS)]
    assert (fitted["value"] > 0.999).all() and len(fitted) == 3 * 3 * 3  # kinds x layers x (layer + 2 heads)
    cka = table[(table["metric"].isin(["cka", "cka_debiased"])) & (table["scout_layer"] == table["main_layer"])]
    assert (cka["value"] > 0.999).all()
    mean = table[(table["baseline"] == "mean") & (table["metric"] == "r2")]
    np.testing.assert_allclose(mean["value"], 0.0, atol=1e-12)
    shuffled = table[(table["baseline"] == "shuffled") & (table["metric"] == "r2") & (table["head"] == -1)]
    assert (shuffled["value"].abs() < 0.05).all()
    cca = table[table["metric"] == "cca"].set_index(["kind", "scout_layer", "baseline"])["value"]
    assert len(cca) == 3 * 3 * 2 and (cca.xs("none", level="baseline") > 0.999).all()
    assert (cca.xs("shuffled", level="baseline").abs() < 0.1).all()
    assert set(table.columns) == {"pair", "kind", "scout_layer", "main_layer", "head", "metric", "value",
                                  "ci_low", "ci_high", "baseline"}
    ci = table[table["metric"] == "r2"]
    assert ((ci["ci_low"] <= ci["value"] + 1e-9) & (ci["value"] <= ci["ci_high"] + 1e-9)).all()


@pytest.mark.slow
def test_results_do_not_depend_on_sharding(kv_dirs, samples, smoke_config):
    """Out-of-core accumulation: 2 or 4 samples per shard give the same fitted-map figures."""
    def figures(suffix):
        table, _ = analyse_pair(kv_dirs["tiny-scout" + suffix], kv_dirs["tiny-main" + suffix], _passages(samples), "p",
                                _cfg(smoke_config))
        keep = table["baseline"].isin(["none", "mean", "self"]) & table["metric"].isin(["r2", "cosine", "rel_error", "cca"])
        return table[keep].sort_values(["kind", "scout_layer", "head", "metric", "baseline"])["value"].to_numpy()

    by4, by2 = figures(""), figures("-by2")
    assert len(by4) == 3 * 2 * (3 * 3 * 3 + 1)  # kinds x aligned layers x (heads x metrics x predictors + CCA)
    np.testing.assert_allclose(by4, by2, rtol=1e-7, atol=1e-9)
    with pytest.raises(KvpipeError, match="sharded differently"):
        analyse_pair(kv_dirs["tiny-scout"], kv_dirs["tiny-main-by2"], _passages(samples), "p", _cfg(smoke_config))


def _unaligned(run, shard, scout_layers, main_layers):
    """The stage's rows the way it read them before token alignment: every requested layer's table of both models,
    tokens checked alike, the segments' rows of both kept by the scout's segment mask."""
    data = run.data
    tables = {("scout", s): kvstore.read_shard(data.scout, s, shard) for s in scout_layers}
    tables.update({("main", m): kvstore.read_shard(data.main, m, shard) for m in main_layers})
    first = tables[("scout", scout_layers[0])]
    for col in ("sample_idx", "position", "token_id"):
        assert first.column(col).equals(tables[("main", main_layers[0])].column(col))
    keep = pc.is_in(pc.cast(first.column("segment"), pa.string()), value_set=pa.array(run.cfg["segments"], pa.string()))
    mats = {(role, layer, kind): kvstore.matrix(table.filter(keep), kind).astype(np.float64)
            for (role, layer), table in tables.items() for kind in KINDS}
    kept = first.filter(keep)
    segment = pc.cast(kept.column("segment"), pa.string()).to_numpy(zero_copy_only=False)
    return ShardRows(keep, keep, Alignment.identity(len(kept)), segment, kept.column("sample_idx").to_numpy()), mats


@pytest.mark.slow
def test_a_pair_sharing_a_tokenizer_gives_exactly_the_unaligned_results(kv_dirs, samples, smoke_config, monkeypatch):
    cfg = _cfg(smoke_config, segments=["template", "context", "question"])
    aligned, facts = analyse_pair(kv_dirs["tiny-scout"], kv_dirs["tiny-main"], _passages(samples), "p", cfg)
    al = facts["alignment"]
    assert al["identity"] and al["pool"] is None and al["main_tokens"] == al["scout_tokens"] > 0
    assert al["main_unmatched"] == {"template": 0, "context": 0, "question": 0} and al["scout_unused"] == 0
    monkeypatch.setattr(_Run, "matrices", _unaligned)
    unaligned, _ = analyse_pair(kv_dirs["tiny-scout"], kv_dirs["tiny-main"], _passages(samples), "p", cfg)
    pd.testing.assert_frame_equal(aligned, unaligned, check_exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["mean", "max_overlap"])
def test_a_pair_with_different_tokenizers_runs_on_aligned_tokens(kv_dirs, samples_path, samples, smoke_config, tmp_path,
                                                                 pool):
    cfg = _cfg(smoke_config, segments=["template", "context", "question"], alignment={"pool": pool})
    out = tmp_path / "mixed"
    run_structure(kv_dirs["tiny-llama"], kv_dirs["tiny-main"], samples_path, "mixed", cfg, out)
    table, facts = pd.read_parquet(out / "metrics.parquet"), read_json(out / "facts.json")
    al = facts["alignment"]
    assert not al["identity"] and al["pool"] == pool
    main, scout = (kvstore.read_layer(kv_dirs[m], 0, ["sample_idx", "position", "segment"]).column("segment").to_pylist()
                   for m in ("tiny-main", "tiny-llama"))
    assert al["main_tokens"] == len(main) and al["scout_tokens"] == len(scout)
    # template tokens cover no context or question character: they, and only they, have no counterpart
    assert al["main_unmatched"] == {"template": main.count("template"), "context": 0, "question": 0}
    assert al["scout_unused"] == scout.count("template")
    test_main_tokens = facts["n_test_tokens"]
    assert 0 < test_main_tokens < len(main) - main.count("template")
    same, _ = analyse_pair(kv_dirs["tiny-scout"], kv_dirs["tiny-main"], _passages(samples), "p", cfg)
    key = ["kind", "scout_layer", "main_layer", "head", "metric", "baseline"]   # both scouts have two layers
    pd.testing.assert_frame_equal(table[key], same[key])
    fitted = table[(table["baseline"] == "none") & (table["metric"] == "r2") & (table["head"] == -1)]
    assert len(fitted) == 3 * 2 and fitted["value"].notna().all()
    cka = table[table["metric"] == "cka"]
    assert len(cka) == 3 * 2 * 3 and cka["value"].between(0, 1).all()
    report = tmp_path / "report"
    write_report(out / "metrics.parquet", out / "facts.json", "synthetic-small", report)
    summary = (report / "summary.md").read_text()
    assert (f"Tokens: the tokenizers differ; each main token is paired with the scout tokens covering its characters "
            f"({'the mean of their rows' if pool == 'mean' else 'the row of the one sharing the most characters'}; "
            f"`alignment.pool: {pool}`). {main.count('template')} of {len(main)} main tokens have no scout counterpart "
            f"and are left out (template {main.count('template')}, context 0, question 0)") in summary


@pytest.mark.slow
def test_run_structure_writes_the_table_and_facts_and_the_report_reads_only_them(kv_dirs, samples_path, samples,
                                                                                  smoke_config, tmp_path):
    out = tmp_path / "tiny"
    run_structure(kv_dirs["tiny-scout"], kv_dirs["tiny-main"], samples_path, "tiny", _cfg(smoke_config), out)
    assert sorted(p.name for p in out.iterdir()) == ["facts.json", "metrics.parquet"]
    facts, passages = read_json(out / "facts.json"), _passages(samples)
    assert facts["n_passages"] == len(set(passages)) < len(passages)  # the smoke set has a passage with two questions
    assert facts["n_calibration_passages"] + facts["n_test_passages"] == facts["n_passages"]
    assert facts["n_calibration_samples"] + facts["n_test_samples"] == facts["n_samples"] == len(passages)
    report = tmp_path / "report"
    write_report(out / "metrics.parquet", out / "facts.json", "synthetic-small", report)
    summary = (report / "summary.md").read_text()
    assert "split by passage" in summary and "Does RoPE make the key space shared?" in summary
    assert "bootstrap over test passages" in summary and "Thresholds (config `structure.thresholds`)" in summary
    assert "Resolution: with" in summary and "Position only" in summary and "Do shallow layers transfer values" in summary
    assert "Tokens: both models tokenise every sample alike; main token i is paired with scout token i." in summary
    assert "keys − keys pre-RoPE: not testable on this pair: head sizes differ (8 vs 16)" in summary
    assert facts["cca"] == {"scout_components": 16, "main_components": 32, "top": 10, "regularisation": 1e-3}
    assert "Shared subspace: regularised CCA (SVCCA-style: the top 16 / 32 SVD components" in summary
    assert "mean of the top 10 canonical correlations on test passages" in summary
    assert sorted(p.name for p in (report / "figures").iterdir()) == sorted(
        f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf"))


@pytest.mark.parametrize("edit, message", [
    (lambda frame: frame.iloc[::-1], "not the sample table the KV dataset .* was extracted from"),
    (lambda frame: frame.drop(columns="passage"), "no 'passage' column"),
])
def test_run_structure_rejects_another_sample_table(kv_dirs, samples, smoke_config, tmp_path, edit, message):
    other = tmp_path / "samples.parquet"
    edit(samples).to_parquet(other, index=False)
    with pytest.raises(KvpipeError, match=message):
        run_structure(kv_dirs["tiny-scout"], kv_dirs["tiny-main"], other, "tiny", _cfg(smoke_config), tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("module, absent", [
    ("report", ["matplotlib", "kvpipe.structure.stage", "kvpipe.structure.cka", "kvpipe.linalg.ridge"]),
    ("stage", ["matplotlib", "kvpipe.structure.report"]),
])
def test_report_and_compute_modules_import_independently(module, absent):
    """The workflow imports report.FIGURES at DAG-build time; report and compute code must not pull each other in."""
    code = f"import sys, kvpipe.structure.{module}; assert not {set(absent)!r} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_new_metrics_and_the_equal_head_size_rope_comparison(kv_dirs, samples, smoke_config):
    table, facts = analyse_pair(kv_dirs["tiny-scout"], kv_dirs["tiny-main"], _passages(samples), "p", _cfg(smoke_config))
    per_dim = table[table["metric"] == "r2_per_dim"]
    assert set(per_dim["baseline"]) == {"none", "position"} and len(per_dim) == 3 * 2 * 2 * 3
    position = table[(table["baseline"] == "position") & (table["metric"] == "r2") & (table["head"] == -1)]
    assert len(position) == 3 * 2 and position["value"].notna().all()
    p = table[table["metric"] == "r2_difference_p_holm"]
    assert len(p) == 2 * 2 and ((p["value"] >= 0) & (p["value"] <= 1)).all()
    assert set(table[table["metric"] == "r2_depth_slope"]["kind"]) == set(ex.kvstore.KINDS)
    cca = table[table["metric"] == "cca"]
    assert len(cca) == 3 * 2 * 2 and set(cca["baseline"]) == {"none", "shuffled"} and (cca["head"] == -1).all()
    assert ((cca["ci_low"] <= cca["value"]) & (cca["value"] <= cca["ci_high"]) & (cca["value"].abs() <= 1)).all()
    true, null = (cca[cca["baseline"] == b].set_index(["kind", "scout_layer"])["value"] for b in ("none", "shuffled"))
    assert (true > null + 0.2).all()   # the tiny pair shares some structure; shuffled pairings share none
    summary = summary_markdown(table, facts | {"scout_head_dim": 16}, "synthetic-small", FIGURES)
    assert "not testable" not in summary and "R² keys − keys pre-RoPE | Holm p" in summary

"""The projection report on a synthetic stage output with planted effects: aggregates, verdicts, figures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kvpipe.estimands import AT_FLOOR
from kvpipe.projection import STAGE
from kvpipe.projection.aggregate import BASELINE, VARIANT, aggregate, label, on_front, pareto_front
from kvpipe.projection.report import FIGURES, write_report
from kvpipe.projection.summary import summary_markdown
from kvpipe.settings import ProjectionSettings, recorded
from kvpipe.stats import holm

BASE = np.array([1.0, 0.8, 0.6, 1.0, 0.4, 0.9])   # main_full answerable F1 per passage; every question of it alike
CFG = {"bootstrap": 300, "ci": 0.95, "seed": 3, "retention": 1.0, "chain": {"retention": [0.5, 1.0], "rank": [4, -1]},
       "ttft": {"link_mbps": [100, 1000], "target": 0.3}}
SETTINGS = recorded(ProjectionSettings, "projection", CFG)
MARGIN = 0.05
IMPOSSIBLE = (False, True)   # question q of a passage (two per passage unless said)
# (condition, projector, objective, key_map, retention, rank, bottom_layers, hidden_layer) ->
#   (answerable F1 as a function of BASE, whether it abstains on unanswerable questions, bytes, ttft parts)
VARIANTS = {
    BASELINE: (lambda b: b, True, 1000, 1.0),
    ("no_context", "none", "none", "none", 1.0, -1, -1, -1): (lambda b: 0.1 * b, False, 0, 0.05),
    ("mean_kv", "none", "none", "none", 1.0, -1, -1, -1): (lambda b: 0 * b, False, 0, 0.1),
    ("always_abstain", "none", "none", "none", 1.0, -1, -1, -1): (lambda b: 0 * b, True, 0, np.nan),
    ("projected_kv", "ridge", "reconstruction", "pre_rope", 1.0, -1, -1, -1): (lambda b: b, True, 50_000, 0.2),
    ("projected_kv", "mlp", "attention", "pre_rope", 1.0, -1, -1, -1): (lambda b: 0.5 * b, True, 50_000, 0.25),
    ("projected_kv", "ridge", "reconstruction", "post_rope", 1.0, -1, -1, -1): (lambda b: 0.25 * b, False, 50_000, np.nan),
    ("projected_k_own_v", "ridge", "reconstruction", "pre_rope", 1.0, -1, -1, -1): (lambda b: b, True, 25_000, np.nan),
    ("own_k_projected_v", "ridge", "reconstruction", "none", 1.0, -1, -1, -1): (lambda b: 0 * b, False, 25_000, np.nan),
    ("scout_selection", "none", "none", "none", 0.5, -1, -1, -1): (lambda b: b - 0.1, True, 1100, np.nan),
    **{("chain", "ridge", "reconstruction", "pre_rope", r, k, -1, -1): (lambda b, r=r, k=k: b * r * (0.9 if k > 0 else 1),
                                                               False, 50_000 * r * (0.1 if k > 0 else 1) + 10, np.nan)
       for r in (0.5, 1.0) for k in (4, -1)},
}


def _answers(impossible: tuple[bool, ...] = IMPOSSIBLE, variants: dict | None = None) -> pd.DataFrame:
    rows = []
    for variant, (f1, abstains, nbytes, _) in (variants or VARIANTS).items():
        for p, value in enumerate(f1(BASE)):
            for q, unanswerable in enumerate(impossible):
                idx = len(impossible) * p + q
                abstained = abstains if unanswerable else variant[0] == "always_abstain"
                score = float(abstained) if unanswerable else value
                rows.append(dict(zip(VARIANT, variant))
                            | {"sample_idx": idx, "sample_id": f"s{idx}", "passage": f"p{p}", "is_impossible": unanswerable,
                               "reply": "unanswerable" if abstained else "x", "prediction": "" if abstained else "x",
                               "exact": float(score == 1), "f1": score, "abstained": abstained, "empty": False,
                               "bytes": int(nbytes), "n_context": 100, "n_tokens": 120})
    return pd.DataFrame(rows)


def _ttft(n: int = 2 * len(BASE)) -> pd.DataFrame:
    """The stage's ttft.parquet: the measured parts, rows only for the variants it timed."""
    rows = [dict(zip(VARIANT, variant)) | {"sample_idx": idx, "own_prefill_s": 0.0, "build_s": 0.0,
                                           "scout_s": 0.4 if variant[0] == "projected_kv" else 0.0,
                                           "question_s": ttft, "bytes": int(nbytes)}
            for variant, (_, _, nbytes, ttft) in VARIANTS.items() if not np.isnan(ttft) for idx in range(n)]
    return pd.DataFrame(rows)


def _metrics() -> pd.DataFrame:
    rows = []
    for projector, objective, kinds in (("ridge", "reconstruction", ("key", "key_post", "value")),
                                        ("mlp", "attention", ("key", "value")), ("mean", "none", ("key", "value"))):
        for kind in kinds:
            for layer in range(4):
                good = {"key": 0.9, "key_post": 0.5, "value": 0.2}[kind] * (projector != "mean")
                for metric, value in (("cosine", 0.5 + good / 2), ("rel_error", 1 - good), ("r2", good - 0.01 * layer)):
                    rows.append({"projector": projector, "objective": objective, "kind": kind, "main_layer": layer,
                                 "scout_layer": layer // 2, "relative_depth": layer / 3, "metric": metric,
                                 "value": value, "ci_low": value - 0.05, "ci_high": value + 0.05})
    return pd.DataFrame(rows)


FACTS = {"pair": "tiny", "scout": "tiny-scout", "main": "tiny-main", "dataset": "synthetic-small", "n_samples": 20,
         "n_test_samples": 12, "n_calibration_samples": 8, "n_test_passages": 6,
         "layer_map": {"name": "relative_depth", "scout_layer_of_main": [0, 0, 1, 1]},
         "projectors": {"ridge/reconstruction": {"params": 4096, "bytes": 8192, "calibration_error": 0.1,
                                                 "validation_error": 0.12}},
         "projection": CFG, "text_bytes_mean": 1000.0}


@pytest.fixture(scope="module")
def agg() -> pd.DataFrame:
    return aggregate(_answers(), SETTINGS, MARGIN)


def _row(agg: pd.DataFrame, variant: tuple) -> pd.Series:
    sel = agg[[tuple(r) == variant for r in agg[list(VARIANT)].itertuples(index=False)]]
    assert len(sel) == 1
    return sel.iloc[0]


def test_aggregates_recover_the_planted_effects(agg):
    assert len(agg) == len(VARIANTS) and agg.iloc[0]["condition"] == "main_full"
    assert (agg["n"] == 12).all() and (agg["n_answerable"] == 6).all() and (agg["n_passages"] == 6).all()
    full, ridge = _row(agg, BASELINE), _row(agg, ("projected_kv", "ridge", "reconstruction", "pre_rope", 1.0, -1, -1, -1))
    assert full["f1_answerable"] == pytest.approx(BASE.mean()) and full["f1"] == pytest.approx((BASE.mean() + 1) / 2)
    assert full["abstain_unanswerable"] == 1 and full["abstain_answerable"] == 0
    assert (ridge["delta_f1"], ridge["delta_f1_low"], ridge["delta_f1_high"], ridge["p_value"]) == (0, 0, 0, 1)
    assert not ridge["survives"] and ridge["verdict"] == "equivalent" and ridge["carries_content"]
    assert ridge["bytes_ratio"] == 50 and not any("ttft" in c for c in agg.columns)
    null = _row(agg, ("mean_kv", "none", "none", "none", 1.0, -1, -1, -1))
    assert null["f1_answerable"] == 0 and null["delta_f1"] == pytest.approx(-BASE.mean()) and null["survives"]
    assert null["delta_f1_low"] < -BASE.mean() < null["delta_f1_high"] < 0 and null["bytes"] == 0
    assert null["verdict"] == "worse" and not null["carries_content"]
    post = _row(agg, ("projected_kv", "ridge", "reconstruction", "post_rope", 1.0, -1, -1, -1))
    assert post["delta_f1"] == pytest.approx(-0.75 * BASE.mean()) and post["verdict_vs_no_context"] == "better"


def test_a_cache_that_only_abstains_wins_no_verdict():
    """The issue's planted check: on a set with 60 % unanswerable questions a cache replaced by noise that abstains on
    every question has the highest all-question F1, and is still neither as good as main_full nor carrying content."""
    noise = ("projected_kv", "mlp", "reconstruction", "pre_rope", 1.0, -1, -1, -1)
    variants = {v: VARIANTS[v] for v in (BASELINE, ("no_context", "none", "none", "none", 1.0, -1, -1, -1),
                                         ("mean_kv", "none", "none", "none", 1.0, -1, -1, -1))}
    variants[BASELINE] = (lambda b: b, False, 1000, 1.0)   # main_full tries to answer everything
    variants[noise] = (lambda b: 0 * b, True, 50_000, 0.2)
    answers = _answers((False, False, True, True, True), variants)
    agg = aggregate(answers, SETTINGS, MARGIN)
    row = _row(agg, noise)
    assert row["f1"] > _row(agg, BASELINE)["f1"]                     # the all-question F1 it would have won
    assert row["verdict"] == "worse" and row["f1_answerable"] == 0 and not row["carries_content"]
    assert row["abstain_unanswerable"] == 1
    text = summary_markdown(agg, answers, _metrics(), FACTS, "planted", MARGIN)
    assert "**No injected cache carries content**" in text and "equivalent to main_full" not in text


def test_no_cache_is_judged_against_a_main_full_at_its_floor():
    """main_full no better than no_context (a task the main cannot do): a projected cache that also scores 0 would be
    'equivalent to main_full' by construction; every verdict against main_full reads 'at the floor' instead."""
    floor = {v: (lambda b: 0 * b, False, 0, np.nan) for v in VARIANTS if v[0] in ("no_context", "mean_kv")}
    cache = ("projected_kv", "ridge", "reconstruction", "pre_rope", 1.0, -1, -1, -1)
    variants = {BASELINE: (lambda b: 0 * b, False, 1000, 1.0), cache: (lambda b: 0 * b, False, 50_000, 0.2)} | floor
    agg = aggregate(_answers(variants=variants), SETTINGS, MARGIN)
    judged = agg[agg["condition"] != "main_full"]
    assert set(judged["verdict"]) == {AT_FLOOR} and not judged["carries_content"].any()
    assert _row(agg, BASELINE)["verdict_vs_no_context"] == "equivalent"   # 0 − 0: at its floor
    text = summary_markdown(agg, _answers(variants=variants), _metrics(), FACTS, "planted", MARGIN)
    assert "equivalent to main_full" not in text and "at the floor" in text
    assert _row(aggregate(_answers(), SETTINGS, MARGIN), cache)["verdict"] != AT_FLOOR   # a main_full that reads


def test_hybrid_layers_are_their_own_typed_columns():
    """B and L are variant columns of their own (not the chain's rank): one row per value, ordered, labelled."""
    floors = [v for v in VARIANTS if v[0] in ("no_context", "mean_kv")]
    hybrid = {("own_bottom_projected_top", "ridge", "reconstruction", "pre_rope", 1.0, -1, b, -1):
              (lambda x, b=b: x * b / 4, True, 1000 * b, np.nan) for b in (3, 1)}
    hybrid[("projected_hidden", "ridge", "reconstruction", "pre_rope", 1.0, -1, -1, 2)] = (lambda x: x / 2, True, 10, np.nan)
    agg = aggregate(_answers(variants={v: VARIANTS[v] for v in (BASELINE, *floors)} | hybrid), SETTINGS, MARGIN)
    rows = agg[agg["condition"].isin(("own_bottom_projected_top", "projected_hidden"))]
    assert all(agg[c].dtype == np.int64 for c in ("rank", "bottom_layers", "hidden_layer"))
    assert (rows["rank"] == -1).all()
    assert [label(r) for _, r in rows.iterrows()] == [
        "own_bottom_projected_top ridge/reconstruction B=1", "own_bottom_projected_top ridge/reconstruction B=3",
        "projected_hidden ridge/reconstruction L=2"]
    assert rows["f1_answerable"].to_numpy() == pytest.approx(BASE.mean() * np.array([1 / 4, 3 / 4, 1 / 2]))


def test_holm_is_applied_over_every_variant_but_main_full(agg):
    family = agg["condition"] != "main_full"
    assert agg.loc[~family, ["p_value", "p_holm", "detectable"]].isna().all().all()
    np.testing.assert_allclose(agg.loc[family, "p_holm"], holm(agg.loc[family, "p_value"]))
    assert (agg["survives"] == (agg["p_holm"] < 0.05)).all()
    assert (agg.loc[family, "p_holm"] >= agg.loc[family, "p_value"]).all() and (agg.loc[family, "detectable"] >= 0).all()


def test_intervals_resample_passages_not_questions():
    """Both answerable questions of a passage score alike: the intervals must equal those of one per passage."""
    two, one = aggregate(_answers((False, False)), SETTINGS, MARGIN), aggregate(_answers((False,)), SETTINGS, MARGIN)
    cols = ["f1_answerable_low", "f1_answerable_high", "delta_f1_low", "delta_f1_high"]
    np.testing.assert_allclose(two[cols], one[cols], rtol=1e-12)
    assert (two["f1_answerable_high"] - two["f1_answerable_low"]).iloc[0] > 0.1
    per_question = _answers((False, False)).assign(passage=lambda a: a["sample_id"])   # resampling questions instead
    assert not np.allclose(aggregate(per_question, SETTINGS, MARGIN)[cols], two[cols])


def test_pareto_front_keeps_the_best_f1_at_no_more_bytes():
    cost = [0, 10, 10, 100, 50, 1000, 100]
    value = [0.1, 0.5, 0.4, 0.6, 0.3, 0.6, 0.6]
    assert pareto_front(cost, value).tolist() == [True, True, False, True, False, False, False]
    diagnostic = pd.DataFrame({"condition": ["main_full", "projected_k_own_v", "mean_kv", "always_abstain"],
                               "bytes": [1000, 10, 0, 0], "f1_answerable": [0.8, 0.9, 0.0, 0.0]})
    assert on_front(diagnostic).tolist() == [True, False, True, False]   # the hybrid needs the main's own prefill


def test_summary_states_the_verdicts(agg):
    text = summary_markdown(agg, _answers(), _metrics(), FACTS, "synthetic-small", MARGIN)
    lines = text.splitlines()
    ridge = next(line for line in lines if line.startswith("| projected_kv ridge/reconstruction |"))
    assert "equivalent (" in ridge and "| yes |" in ridge
    mlp = next(line for line in lines if line.startswith("| projected_kv mlp/attention |"))
    assert "worse (" in mlp
    keys = next(line for line in lines if line.startswith("| ridge/reconstruction |") and "value-only" in line)
    assert "better than value-only transfer" in keys
    assert "12 questions on 6 passages" in text and "6 answerable" in text and "relative_depth" in text
    assert "0.9997" in text and "Estimand of every verdict: answerable F1" in text
    assert "smallest answerable-ΔF1 distinguishable from 0" in text and "Deltas that survive:" in text
    survivors, front = text.split("Deltas that survive:")[1].split("\n")[0].split("Pareto front")
    assert "mean_kv" in survivors and "projected_kv ridge/reconstruction," not in survivors
    assert front.endswith("main_full, no_context.")
    assert "Injected caches that carry content: projected_kv ridge/reconstruction" in text
    assert "timing.md" in text and "TTFT" not in text
    chain = [line for line in lines if line.startswith("| ridge/reconstruction | 0.50 |")]
    assert len(chain) == 2 and all("| -" in line for line in chain)


@pytest.mark.slow
def test_write_report_writes_every_figure_and_is_reproducible(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    _answers().to_parquet(stage / "answers.parquet")
    _metrics().to_parquet(stage / "metrics.parquet")
    (stage / "facts.json").write_text(json.dumps(FACTS))
    outs = [tmp_path / "a", tmp_path / "b"]
    for i, out in enumerate(outs):   # the second run measured other times
        timing = {name: stage / f"{i}-{name}" for name in STAGE.timing}
        pd.DataFrame({"sample_idx": range(12), "scout_prefill_s": 0.1 + i, "main_prefill_s": 0.5 + i,
                      "answer_s": 0.2}).to_parquet(timing["timings.parquet"])
        ttft = _ttft()
        ttft["question_s"] *= 1 + i
        ttft.to_parquet(timing["ttft.parquet"])
        timing["timings.json"].write_text(json.dumps({"fit_s": {"ridge/reconstruction": 1.5 + i},
                                                      "phases": {"statistics_s": 2.0, "fit_s": 1.5 + i}}))
        write_report(stage / "answers.parquet", stage / "metrics.parquet", stage / "facts.json", timing,
                     "synthetic-small", out, {"equivalence_margin": MARGIN})
    names = {f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")}
    assert {p.name for p in (outs[0] / "figures").iterdir()} == names
    for rel in [f"figures/{n}" for n in names] + ["summary.md", "aggregates.parquet"]:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    timing_md = (outs[0] / "timing.md").read_text()
    assert "Median per sample: scout side 0.100 s, main prefill 0.500 s" in timing_md
    e2e = timing_md.split("### end to end at 1000 Mbit/s")[1]
    assert "| projected_kv ridge/reconstruction | 12 | 0.600 | 0.600 [0.600, 0.600] | misses |" in e2e
    assert "| mean_kv | 12 | 0.100 | 0.100 [0.100, 0.100] | no verdict: carries no content |" in e2e
    assert "| ridge/reconstruction | 1.5 |" in timing_md and "main prefill 1.500 s" in (outs[1] / "timing.md").read_text()


def test_report_module_imports_no_matplotlib():
    """The workflow imports report.FIGURES at DAG-build time."""
    code = "import sys, kvpipe.projection.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_condition_of_the_documented_order_has_its_own_marker_and_colour():
    """Markers and colours follow CONDITION_ORDER (the schema's default conditions), not a list of names."""
    from kvpipe.projection.aggregate import CONDITION_ORDER
    from kvpipe.projection.figures import MARKERS, _colour, _marker

    assert len(MARKERS) == len(CONDITION_ORDER)
    assert len({_marker(c) for c in CONDITION_ORDER}) == len({_colour(c) for c in CONDITION_ORDER}) == len(CONDITION_ORDER)
    assert _marker("main_full") == ("*", 14) and _marker("fused") == ("o", 6) and _colour("fused") == "grey"

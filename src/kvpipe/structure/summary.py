"""The markdown summary of the structural analysis: the notes' claims beside measured figures, baselines, verdicts.

Reads only the metrics table and the run facts (thresholds included), so it imports no compute code.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from kvpipe.reporting import fmt_ci

KIND_LABELS = {"key": "keys (post-RoPE)", "key_pre_rope": "keys (pre-RoPE)", "value": "values"}

# The notes' claims (Qwen2.5-3B -> 7B), with the test each must pass here.
CLAIMS = {
    "keys_cosine": 0.9997, "keys_rel_error": 0.048, "values_cosine": 0.222, "values_rel_error": 1.076,
    "last_layer_cka": 0.995, "projection_error": 0.015,
}


def _get(table: pd.DataFrame, **where: Any) -> pd.Series:
    sel = table
    for col, val in where.items():
        sel = sel[sel[col] == val]
    if len(sel) != 1:
        raise ValueError(f"expected one row for {where}, found {len(sel)}")
    return sel.iloc[0]


def _fmt(row: pd.Series, pct: bool = False) -> str:
    return fmt_ci(row["value"], row["ci_low"], row["ci_high"], percent=pct)


def _alignment_line(facts: dict[str, Any]) -> str:
    """How scout and main tokens were paired, and how many had no counterpart (facts `alignment`)."""
    al = facts["alignment"]
    if al["identity"]:
        return "Tokens: both models tokenise every sample alike; main token i is paired with scout token i."
    how = {"mean": "the mean of their rows", "max_overlap": "the row of the one sharing the most characters"}[al["pool"]]
    unmatched = al["main_unmatched"]
    per_segment = ", ".join(f"{seg} {unmatched[seg]}" for seg in facts["segments"])
    return (f"Tokens: the tokenizers differ; each main token is paired with the scout tokens covering its characters "
            f"({how}; `alignment.pool: {al['pool']}`). {sum(unmatched.values())} of {al['main_tokens']} main tokens "
            f"have no scout counterpart and are left out ({per_segment}); {al['scout_unused']} of {al['scout_tokens']} "
            "scout tokens cover no kept main token.")


def _header(facts: dict[str, Any], dataset: str) -> list[str]:
    s_last, m_last = facts["aligned_layers"][-1]
    t = facts["thresholds"]
    return [
        f"# Structural analysis: {facts['scout']} → {facts['main']} on {dataset}",
        "",
        f"{facts['n_calibration_samples']} calibration and {facts['n_test_samples']} test samples from "
        f"{facts['n_calibration_passages']} and {facts['n_test_passages']} of {facts['n_passages']} passages (split by "
        f"passage: questions on one passage share its context), {facts['n_test_tokens']} test tokens of segments "
        f"{', '.join(facts['segments'])}; CKA on {facts['cka_tokens']} sampled tokens. Intervals: "
        f"{int(round(100 * facts['ci']))} % bootstrap over test passages ({facts['bootstrap']} resamples); CKA: "
        f"delete-half jackknife over passages. Headline layer: scout {s_last} → main {m_last} (the last aligned pair). "
        "Centred R² = 1 − SSE / SSE of the calibration-mean predictor: 0 for that predictor, 1 for a perfect map; "
        "pooled R² weights output dimensions by their variance, per-dimension R² is the plain mean over dimensions.",
        "",
        _alignment_line(facts),
        "",
        f"Thresholds (config `structure.thresholds`): keys transfer if pooled R² ≥ {t['keys_r2']} (lower CI bound); "
        f"relative error ≤ {100 * t['rel_error']:.0f} % (upper bound); debiased CKA ≥ {t['cka_debiased']}; "
        f"projection error ≤ {100 * t['projection_error']:.0f} %; position-only key R² ≥ {t['position_r2']}; "
        f"per-layer tests Holm-adjusted at family-wise α = {t['alpha']}.",
        "",
        "| claim (notes, Qwen2.5 3B→7B) | measured here | baselines | verdict |",
        "|---|---|---|---|",
    ]


def _transfer_claims(table: pd.DataFrame, last: dict[str, int], t: dict[str, float]) -> list[str]:
    def fig(kind: str, metric: str, baseline: str = "none") -> pd.Series:
        return _get(table, kind=kind, metric=metric, baseline=baseline, **last)

    lines = []
    for kind, cos_claim, err_claim in (("key", "keys_cosine", "keys_rel_error"), ("value", "values_cosine", "values_rel_error")):
        cos, mean_cos, gain = fig(kind, "cosine"), fig(kind, "cosine", "mean"), fig(kind, "cosine_gain_over_mean", "mean")
        r2, r2d, shuf = fig(kind, "r2"), fig(kind, "r2_per_dim"), fig(kind, "r2", "shuffled")
        err, mean_err = fig(kind, "rel_error"), fig(kind, "rel_error", "mean")
        name = "keys" if kind == "key" else "values"
        if kind == "key":
            verdict = (f"holds: keys are predicted far beyond their mean (R² ≥ {t['keys_r2']})" if r2["ci_low"] >= t["keys_r2"]
                       else f"does not hold once the mean is accounted for: centred R² {_fmt(r2)} (< {t['keys_r2']}); "
                       f"the mean predictor alone reaches cosine {mean_cos['value']:.3f}")
        else:
            key_r2 = fig("key", "r2")
            verdict = (f"direction holds: values R² {r2['value']:.3f} < keys R² {key_r2['value']:.3f}"
                       if r2["value"] < key_r2["value"] else
                       f"does not hold: values R² {r2['value']:.3f} ≥ keys R² {key_r2['value']:.3f}")
        lines.append(f"| {name} cosine {CLAIMS[cos_claim]} | cosine {_fmt(cos)}; centred R² {_fmt(r2)} pooled, "
                     f"{_fmt(r2d)} per dimension | mean predictor cosine {_fmt(mean_cos)} (gain over it {_fmt(gain)}); "
                     f"shuffled-pairs R² {_fmt(shuf)} | {verdict} |")
        ok = err["ci_high"] <= t["rel_error"]
        lines.append(f"| {name} relative error {100 * CLAIMS[err_claim]:.1f} % | {_fmt(err, True)} | "
                     f"mean predictor {_fmt(mean_err, True)} | "
                     f"{'holds' if ok else 'does not hold'} (≤ {100 * t['rel_error']:.0f} %) "
                     f"for {name}; {'better' if err['value'] < mean_err['value'] else 'no better'} than the mean |")
    return lines


def _cka_and_projection_claims(table: pd.DataFrame, last: dict[str, int], t: dict[str, float]) -> list[str]:
    lines = []
    for kind in ("key", "value"):
        b = _get(table, kind=kind, metric="cka", baseline="none", **last)
        d = _get(table, kind=kind, metric="cka_debiased", baseline="none", **last)
        ok = d["value"] >= t["cka_debiased"]
        lines.append(f"| last-layer CKA {CLAIMS['last_layer_cka']} ({'keys' if kind == 'key' else 'values'}) | "
                     f"debiased {_fmt(d)} | biased {_fmt(b)} (inflated when tokens ≪ dims) | "
                     f"{'holds' if ok else 'does not hold'} (debiased {'≥' if ok else '<'} {t['cka_debiased']}) |")
    errs = [_get(table, kind=k, metric="rel_error", baseline="none", **last) for k in ("key", "value")]
    ok = all(e["value"] <= t["projection_error"] for e in errs)
    lines.append(f"| linear projection error {100 * CLAIMS['projection_error']:.1f} % (last layer KV) | keys "
                 f"{_fmt(errs[0], True)}, values {_fmt(errs[1], True)} | see mean predictor above | "
                 f"{'holds' if ok else 'does not hold'} (≤ {100 * t['projection_error']:.0f} % for both) |")
    return lines


def _power_line(table: pd.DataFrame, facts: dict[str, Any], last: dict[str, int]) -> list[str]:
    mde = _get(table, kind="key-vs-value", metric="r2_difference_mde", **last)["value"]
    return ["", f"Resolution: with {facts['n_test_passages']} test passages, the smallest keys − values R² difference "
            f"at the last layer that the {int(round(100 * facts['ci']))} % interval could tell from 0 is ≈ {mde:.3f} "
            "(z × bootstrap SE of the difference)."]


def _cca_lines(table: pd.DataFrame, facts: dict[str, Any], last: dict[str, int]) -> list[str]:
    c, cells, beyond = facts["cca"], [], []
    for kind, label in KIND_LABELS.items():
        cca, null = (_get(table, kind=kind, metric="cca", baseline=b, **last) for b in ("none", "shuffled"))
        cells.append(f"{label} {_fmt(cca)} (null {_fmt(null)})")
        if cca["ci_low"] > null["ci_high"]:
            beyond.append(label)
    return ["", f"Shared subspace: regularised CCA (SVCCA-style: the top {c['scout_components']} / "
            f"{c['main_components']} SVD components of scout / main, ridge {c['regularisation']:g} × their mean "
            f"variance, fitted on calibration passages), mean of the top {c['top']} canonical correlations on test "
            "passages at the last layer, beside the shuffled-pairing null (main rows permuted across test tokens): "
            f"{'; '.join(cells)}. Above the null (lower bound over the null's upper bound): "
            f"{', '.join(beyond) if beyond else 'none'}."]


def _position_lines(table: pd.DataFrame, aligned: list[list[int]], t: dict[str, float]) -> list[str]:
    lines = ["", "Position only: the main's keys and values predicted from the RoPE basis of each token's position "
             "alone (cos/sin of position × the main model's own rotary frequencies), fitted on calibration, R² on test:",
             "", "| scout → main | keys | values (control) |", "|---|---|---|"]
    high = 0
    for s, m in aligned:
        k, v = (_get(table, kind=kind, metric="r2", baseline="position", scout_layer=s, main_layer=m, head=-1)
                for kind in ("key", "value"))
        high += k["ci_low"] >= t["position_r2"]
        lines.append(f"| {s} → {m} | {_fmt(k)} | {_fmt(v)} |")
    return lines + ["", f"Position alone explains ≥ {t['position_r2']} of the keys' variance at {high} of {len(aligned)} "
                    f"depths: the prediction of the RoPE explanation {'holds' if high == len(aligned) else 'fails'}."]


def _difference_lines(table: pd.DataFrame, facts: dict[str, Any], other: str) -> list[str]:
    aligned, alpha = facts["aligned_layers"], facts["thresholds"]["alpha"]
    label = "keys − keys pre-RoPE" if other == "key_pre_rope" else "keys − values"
    if other == "key_pre_rope" and facts["scout_head_dim"] != facts["main_head_dim"]:
        return ["", f"{label}: not testable on this pair: head sizes differ ({facts['scout_head_dim']} vs "
                f"{facts['main_head_dim']}), so some of the main's rotary frequencies have no counterpart in the scout "
                "and post-RoPE keys transfer worse than pre-RoPE keys by construction."]
    lines, better = ["", f"| scout → main | R² {label} | Holm p |", "|---|---|---|"], 0
    for s, m in aligned:
        d, p = (_get(table, kind=f"key-vs-{other}", metric=metric, scout_layer=s, main_layer=m)
                for metric in ("r2_difference", "r2_difference_p_holm"))
        sig = p["value"] < alpha
        better += sig and d["value"] > 0
        lines.append(f"| {s} → {m} | {_fmt(d)} {('✓' if d['value'] > 0 else '✗') if sig else '≈'} | {p['value']:.3f} |")
    return lines + ["", f"{label}: significantly > 0 (Holm, α = {alpha}) at {better} of {len(aligned)} depths."]


def _rope_section(table: pd.DataFrame, facts: dict[str, Any]) -> list[str]:
    lines = ["", "## Does RoPE make the key space shared?", "",
             "If it did, position alone would explain most of the keys' variance (not the values'), and post-RoPE keys "
             "would transfer better than pre-RoPE keys between models of equal head size. Paired bootstrap of the R² "
             "difference per aligned layer, p-values Holm-adjusted over the layers:"]
    lines += _position_lines(table, facts["aligned_layers"], facts["thresholds"])
    return lines + _difference_lines(table, facts, "key_pre_rope") + _difference_lines(table, facts, "value")


def _depth_section(table: pd.DataFrame) -> list[str]:
    sel = table[(table["kind"] == "value") & (table["metric"] == "r2_depth_slope")]
    if sel.empty:
        return ["", "## Do shallow layers transfer values better?", "", "Not testable: fewer than two aligned layers."]
    slope = sel.iloc[0]
    holds = slope["ci_high"] < 0
    return ["", "## Do shallow layers transfer values better?", "",
            f"Slope of the values' R² over relative depth (0 = first layer, 1 = last): {_fmt(slope)}. The notes' "
            f"prediction (negative slope) {'holds' if holds else 'does not hold'}"
            f"{'' if holds else ' (the interval does not lie below 0)'}."]


def summary_markdown(table: pd.DataFrame, facts: dict[str, Any], dataset: str, figures: tuple[str, ...]) -> str:
    """Markdown that sets the notes' claims beside the measured figures and their baselines."""
    s_last, m_last = facts["aligned_layers"][-1]
    last = {"scout_layer": s_last, "main_layer": m_last, "head": -1}
    t = facts["thresholds"]
    lines = (_header(facts, dataset) + _transfer_claims(table, last, t) + _cka_and_projection_claims(table, last, t)
             + _power_line(table, facts, last) + _cca_lines(table, facts, last) + _rope_section(table, facts)
             + _depth_section(table))
    lines += ["", f"Figures: {', '.join(f'`figures/{name}`' for name in figures)} (PNG and PDF).", ""]
    return "\n".join(lines)

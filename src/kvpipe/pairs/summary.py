"""Across the pairs of a run: one row per pair from its structure and selection tables, and the notes' predictions.

Per pair: same or cross family (the two models' architectures), key and value transfer at the last
aligned layer (centred R², per-dimension R² and debiased CKA, pre-RoPE keys, with their
intervals), both models' full-KV answerable F1 beside its no-context floor and the main's minus the
scout's, Q2C overlap of the scout's selection with the main's beside its null, and forward / reverse
ΔF1 at 50 % and 75 % retention with the selection stage's verdicts (kvpipe.estimands: "at the floor"
for a model whose full KV does not beat its no-context floor).
Reads only the stages' tables; the verdicts on the notes' two cross-family predictions (lower
overlap, key transfer failing) use the intervals and contrast the cross-family pairs with the
same-family ones: a prediction is undecided where they overlap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from kvpipe.estimands import above_floor
from kvpipe.io import read_json, write_parquet, write_text
from kvpipe.reporting import fmt_ci

RETENTIONS = (0.5, 0.75)
TRANSFER = {"keys": "key_pre_rope", "values": "value"}   # pre-RoPE keys: fair across head sizes and RoPE setups
STRUCTURE = ("r2", "r2_per_dim", "cka_debiased")


def _pick(frame: pd.DataFrame, **match: Any) -> pd.Series | None:
    rows = frame.loc[(frame[list(match)] == pd.Series(match)).all(axis=1)]
    return rows.iloc[0] if len(rows) else None


def _interval(row: pd.Series | None) -> tuple[float, float, float]:
    return (float("nan"),) * 3 if row is None else (float(row["value"]), float(row["ci_low"]), float(row["ci_high"]))


def _verdict(row: pd.Series | None) -> str:
    """The stage's worded verdict of a row; '' where it has none (or predates verdicts)."""
    return "" if row is None or not isinstance(row.get("verdict"), str) else row["verdict"]


def pair_row(pair: str, metrics: pd.DataFrame, facts: dict[str, Any], aggregates: pd.DataFrame,
             architectures: dict[str, str]) -> dict[str, Any]:
    """The pair's row: family, transfer at the last aligned layer, full-KV and no-context F1, Q2C overlap and ΔF1, each
    as (value, low, high); floor_{role} (the stage's verdict of its full KV against no_context) and
    verdict_{forward|reverse}_{retention} (the stage's verdict of each ΔF1) as words, '' where the record has none."""
    scout, main = facts["scout"], facts["main"]
    whole = metrics[(metrics["head"] == -1) & (metrics["baseline"] == "none")]
    last = int(whole["main_layer"].max())
    row: dict[str, Any] = {"pair": pair, "scout": scout, "main": main, "scout_family": architectures[scout],
                           "main_family": architectures[main], "last_main_layer": last,
                           "keys_r2_threshold": float(facts["thresholds"]["keys_r2"])}
    row["cross_family"] = row["scout_family"] != row["main_family"]
    for name, kind in TRANSFER.items():
        for metric in STRUCTURE:
            row[f"{name}_{metric}"] = _interval(_pick(whole, kind=kind, main_layer=last, metric=metric))
    for role in ("scout", "main"):
        row[f"f1_{role}"] = _interval(_pick(aggregates, table="full_kv", role=role, method="full", quantity="f1_answerable"))
        row[f"f1_{role}_no_context"] = _interval(_pick(aggregates, table="full_kv", role=role, method="no_context",
                                                       quantity="f1_answerable"))
        row[f"floor_{role}"] = _verdict(_pick(aggregates, table="full_kv", role=role, quantity="delta_full_vs_no_context"))
    row["f1_main_minus_scout"] = _interval(_pick(aggregates, table="full_kv", role="pair", method="full",
                                                 quantity="f1_main_minus_scout"))
    for r in RETENTIONS:
        row[f"overlap_{r:g}"] = _interval(_pick(aggregates, table="overlap", method="q2c", retention=r, quantity="overlap"))
        row[f"overlap_null_{r:g}"] = _interval(_pick(aggregates, table="overlap", method="q2c", retention=r,
                                                     quantity="overlap_random"))
        row[f"overlap_gain_{r:g}"] = _interval(_pick(aggregates, table="overlap", method="q2c", retention=r,
                                                     quantity="overlap_minus_random"))
        for direction, role in (("forward", "main"), ("reverse", "scout")):
            delta = _pick(aggregates, table="transfer", role=role, method="q2c", retention=r, quantity=f"delta_{direction}")
            row[f"delta_{direction}_{r:g}"] = _interval(delta)
            row[f"verdict_{direction}_{r:g}"] = _verdict(delta)
    return row


def _tidy(rows: list[dict[str, Any]]) -> pd.DataFrame:
    records = []
    for row in rows:
        for key, value in row.items():
            if isinstance(value, tuple):
                records.append({"pair": row["pair"], "cross_family": row["cross_family"], "quantity": key,
                                "value": value[0], "ci_low": value[1], "ci_high": value[2]})
    return pd.DataFrame.from_records(records, columns=["pair", "cross_family", "quantity", "value", "ci_low", "ci_high"])


def _split(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(same-family rows, cross-family rows)."""
    return [r for r in rows if not r["cross_family"]], [r for r in rows if r["cross_family"]]


def _compare(cross: list[dict[str, Any]], same: list[dict[str, Any]], key: str) -> str:
    """'lower', 'higher' or 'overlapping': every cross-family interval of `key` against every same-family one."""
    if max(r[key][2] for r in cross) < min(r[key][1] for r in same):
        return "lower"
    if min(r[key][1] for r in cross) > max(r[key][2] for r in same):
        return "higher"
    return "overlapping"


def _lower_overlap(rows: list[dict[str, Any]]) -> str:
    same, cross = _split(rows)
    if not same or not cross:
        return "not tested: the run needs a same-family and a cross-family pair"
    return {"lower": "holds: every cross-family pair's Q2C overlap gain over chance lies below every same-family pair's",
            "higher": "does not hold: the cross-family pairs overlap more than the same-family ones",
            "overlapping": "undecided: the intervals of cross- and same-family overlap gains overlap"}[
        _compare(cross, same, "overlap_gain_0.5")]


def _against_threshold(r: dict[str, Any]) -> str:
    _, low, high = r["keys_r2"]
    return "fails" if high < r["keys_r2_threshold"] else "transfers" if low >= r["keys_r2_threshold"] else "undecided"


def _key_transfer_fails(rows: list[dict[str, Any]]) -> str:
    """The notes' prediction is a contrast: keys transfer within a family and fail across families.

    It holds only where every cross-family pair's key R² interval lies below the threshold while every
    same-family one lies above it; keys that fail within the family too say nothing about families.
    """
    same, cross = _split(rows)
    if not cross:
        return "not tested: the run has no cross-family pair"
    threshold = cross[0]["keys_r2_threshold"]
    verdicts = [_against_threshold(r) for r in cross]
    if any(v == "transfers" for v in verdicts):
        return "does not hold: keys transfer across families on " + ", ".join(
            r["pair"] for r, v in zip(cross, verdicts, strict=True) if v == "transfers")
    if not all(v == "fails" for v in verdicts):
        return "undecided: " + ", ".join(f"{r['pair']} {v}" for r, v in zip(cross, verdicts, strict=True))
    if not same:
        return (f"not tested against a reference: every cross-family pair's key R² lies below {threshold}, but the "
                "run has no same-family pair to show keys transfer within a family")
    within = [_against_threshold(r) for r in same]
    if all(v == "transfers" for v in within):
        return (f"holds: every cross-family pair's key R² interval lies below {threshold}, every same-family "
                "pair's above it")
    relation = {"lower": "lies below", "higher": "lies above", "overlapping": "overlaps"}[
        _compare(cross, same, "keys_r2")]
    if all(v == "fails" for v in within):
        return (f"not shown: keys fall below {threshold} within the family too, so failing is not specific to "
                f"crossing families (the cross-family key R² {relation} the same-family one)")
    return (f"undecided: the same-family key R² is not clearly above {threshold} (the cross-family one {relation} "
            "it)")


def ci(v: tuple[float, float, float], signed: bool = False) -> str:
    """The value with its interval; '—' where the pair's run has no such number (e.g. a retention not in its grid)."""
    return "—" if math.isnan(v[0]) else fmt_ci(*v, signed=signed)


def _delta(r: dict[str, Any], direction: str, retention: float) -> str:
    verdict = r[f"verdict_{direction}_{retention:g}"]
    return ci(r[f"delta_{direction}_{retention:g}"], signed=True) + (f" ({verdict})" if verdict else "")


def _floors(rows: list[dict[str, Any]]) -> list[str]:
    """A line per model that does not beat its no-context floor (its transfer deltas are not judged)."""
    out = []
    for r in rows:
        for role in ("scout", "main"):
            if r[f"floor_{role}"] and not above_floor(r[f"floor_{role}"]):
                out.append(f"- {r['pair']}: the {role} ({r[role]}) answers no better from its full KV than with no "
                           f"context ({r[f'floor_{role}']}), so every ΔF1 of its answers reads 'at the floor'.")
            elif not r[f"floor_{role}"]:
                out.append(f"- {r['pair']}: the {role}'s selection record has no verdict of its full KV against its "
                           "no-context floor (it predates the floor, or did not answer no_context), so its ΔF1 verdicts "
                           "are not guarded by it.")
    return out


def summary_markdown(rows: list[dict[str, Any]], dataset: str) -> str:
    """The cross-pair table and the notes' two cross-family predictions with verdicts."""
    lines = [f"# Pairs on {dataset}", "",
             "Last aligned layer; keys are pre-RoPE (fair across head sizes). Intervals are the stages' passage "
             "bootstraps. Overlap: Q2C, the scout's selection against the main's at 50 % retention, beside the "
             "chance overlap of the same budget (null). ΔF1: the main answering from the scout's selection minus "
             "from its own (forward), and the scout from the main's (reverse); every F1 is answerable F1 (kvpipe.estimands). "
             "Full-KV F1: each model answering "
             "from its own whole cache beside its no-context floor (template and question only), and the main's minus "
             "the scout's paired by sample. Verdicts are the selection stage's (kvpipe.estimands).", "",
             "| pair | family | keys R² | keys per-dim R² | keys CKA | values R² | values CKA | Q2C overlap (null) | "
             "F1 scout | F1 main | no-context F1 scout / main | F1 main − scout | ΔF1 fwd 50 % | ΔF1 fwd 75 % | "
             "ΔF1 rev 50 % | ΔF1 rev 75 % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        family = f"cross ({r['scout_family']} → {r['main_family']})" if r["cross_family"] else f"same ({r['main_family']})"
        lines.append(f"| {r['pair']} | {family} | {ci(r['keys_r2'])} | {ci(r['keys_r2_per_dim'])} | "
                     f"{ci(r['keys_cka_debiased'])} | {ci(r['values_r2'])} | {ci(r['values_cka_debiased'])} | "
                     f"{ci(r['overlap_0.5'])} ({ci(r['overlap_null_0.5'][:1] + (math.nan, math.nan))}) | "
                     f"{ci(r['f1_scout'])} | {ci(r['f1_main'])} | {ci(r['f1_scout_no_context'])} / "
                     f"{ci(r['f1_main_no_context'])} | {ci(r['f1_main_minus_scout'], signed=True)} | "
                     + " | ".join(_delta(r, d, x) for d in ("forward", "reverse") for x in RETENTIONS) + " |")
    lines += ["", *floors] if (floors := _floors(rows)) else []
    lines += ["", "## The notes' cross-family predictions", "",
              f"- Lower overlap across families: {_lower_overlap(rows)}.",
              f"- Key transfer fails across families: {_key_transfer_fails(rows)}.", ""]
    return "\n".join(lines)


def write_pairs_summary(pairs: dict[str, dict[str, Path]], cards: dict[str, Path], dataset: str, out_dir: Path) -> None:
    """summary.md and pairs.parquet under out_dir. pairs: name -> {structure_metrics, structure_facts,
    selection_aggregates}; cards: model slug -> its kvpipe_model.json (for the architecture)."""
    architectures = {slug: read_json(Path(card))["architecture"] for slug, card in cards.items()}
    rows = [pair_row(name, pd.read_parquet(p["structure_metrics"]), read_json(Path(p["structure_facts"])),
                     pd.read_parquet(p["selection_aggregates"]), architectures) for name, p in pairs.items()]
    out_dir = Path(out_dir)
    write_parquet(_tidy(rows), out_dir / "pairs.parquet")
    write_text(out_dir / "summary.md", summary_markdown(rows, dataset))

"""Every headline number of the selection-transfer stage with its paired bootstrap interval.

Every interval and p-value resamples *passages*, not questions: questions on one passage share
their context (and so their selections and much of their answers), so each bootstrap draw takes
whole passages with all their questions (kvpipe.stats.PassageBootstrap); resampling
questions would treat them as independent and make intervals too narrow.

The estimand of every F1 verdict is answerable F1 (kvpipe.estimands): table `transfer` is computed
on the answerable questions; `transfer_all` repeats it on every question (shown, never judged) and
`abstention` holds each condition's abstention rate on unanswerable questions and its wrong
abstentions and empty replies on answerable ones. `full_kv` sets each model's full-KV answer
beside its floors (`no_context`; `always_abstain`, role `none`). The family of selection deltas
(forward, reverse, own − random, own − full KV; every method and retention below 1, both models)
gets two-sided bootstrap p-values (normal reference, bootstrap standard error) and Holm's
correction over the whole family (kvpipe.stats.holm): columns `p_value` and `p_holm`, NaN outside
it; every delta gets a `verdict` (better, worse, equivalent by TOST within the margin, undecided).
Each forward delta also gets `detectable_forward`: z × its bootstrap standard error, the smallest
|delta| its interval could tell from 0 at this n. Tables named `overlap_answerable` and
`overlap_unanswerable` repeat the overlap table on answerable / unanswerable samples (kvpipe.estimands.SUBSETS).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kvpipe.errors import KvpipeError
from kvpipe.estimands import ALWAYS_ABSTAIN, AT_FLOOR, NO_CONTEXT, SUBSETS, above_floor, compare, with_failure_flags
from kvpipe.reporting import Interval
from kvpipe.settings import SelectionSettings
from kvpipe.stats import PassageBootstrap, holm

FAMILY = ("delta_forward", "delta_reverse", "delta_own_vs_random", "delta_own_vs_full")
FLOOR_METHODS = (NO_CONTEXT, ALWAYS_ABSTAIN)   # rows that are floors, not selection methods
CHARACTER_OVERLAP = ("char_overlap", "char_overlap_random")   # overlap columns of a pair whose tokenizers differ


class _Table:
    """Rows of the tidy aggregates table; margin: the TOST equivalence margin of every delta's verdict."""

    def __init__(self, margin: float) -> None:
        self.rows: list[dict[str, Any]] = []
        self.margin = margin

    def add(self, table: str, role: str, method: str, retention: float, quantity: str, v: Interval,
            p: float = math.nan, verdict: str = "") -> None:
        self.rows.append({"table": table, "role": role, "method": method, "retention": retention, "quantity": quantity,
                          "value": v[0], "ci_low": v[1], "ci_high": v[2], "p_value": p, "verdict": verdict})

    def delta(self, table: str, role: str, method: str, r: float, quantity: str, boot: PassageBootstrap, a: pd.Series,
              b: pd.Series) -> None:
        """A delta row with its verdict; family deltas below retention 1 carry their p-value, forward ones their
        detectable size."""
        c = compare(*boot.replicates(a.reindex(boot.samples) - b.reindex(boot.samples)), boot.level, self.margin)
        in_family = table == "transfer" and quantity in FAMILY and r < 1
        self.add(table, role, method, r, quantity, (c.delta, c.low, c.high), c.p_value if in_family else math.nan,
                 c.verdict)
        if quantity == "delta_forward":
            self.add(table, role, method, r, "detectable_forward", (c.detectable, math.nan, math.nan))


def _rates(out: _Table, table: str, role: str, method: str, r: float, rows: pd.DataFrame, boot: PassageBootstrap,
           suffix: str = "") -> None:
    """F1 on each kind of question, abstention on unanswerable ones, wrong abstentions and empty replies on answerable
    ones (rows indexed by sample_idx), each where its subset is not empty; `suffix` ends each quantity's name."""
    impossible = rows["is_impossible"].astype(bool)
    for quantity, column, mask in (("f1_answerable", "f1", ~impossible), ("f1_unanswerable", "f1", impossible),
                                   ("abstain_unanswerable", "abstained", impossible),
                                   ("abstain_answerable", "abstained", ~impossible),
                                   ("empty_answerable", "empty", ~impossible)):
        values = rows.loc[mask, column].astype(float) if column in rows else pd.Series(dtype=float)
        if mask.any() and values.notna().all():
            out.add(table, role, method, r, quantity + suffix, boot.subset(rows.index[mask]).mean(values))


def _full_kv(out: _Table, answers: pd.DataFrame, boot: PassageBootstrap) -> None:
    """Each model's full-KV answer beside its floors (no_context, always_abstain): F1 on every question and on each
    kind, abstention, exact match; full KV minus no_context and main minus scout on answerable questions."""
    answerable = answers.groupby("sample_idx")["is_impossible"].first()
    answerable = answerable.index[~answerable.astype(bool)]
    sub = boot.subset(answerable) if len(answerable) else None
    f1 = {}
    for role in ("scout", "main"):
        full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")
        f1[role] = full["f1"]
        out.add("full_kv", role, "full", 1.0, "f1", boot.mean(full["f1"]))
        out.add("full_kv", role, "full", 1.0, "exact", boot.mean(full["exact"]))
        _rates(out, "full_kv", role, "full", 1.0, full, boot)
        floor = answers[(answers["role"] == role) & (answers["method"] == NO_CONTEXT)].set_index("sample_idx")
        if len(floor):
            out.add("full_kv", role, NO_CONTEXT, 0.0, "f1", boot.mean(floor["f1"]))
            _rates(out, "full_kv", role, NO_CONTEXT, 0.0, floor, boot)
            if sub is not None:
                out.delta("full_kv", role, "full", 1.0, "delta_full_vs_no_context", sub, full["f1"].loc[answerable],
                          floor["f1"].loc[answerable])
    abstain = answers[answers["method"] == ALWAYS_ABSTAIN].set_index("sample_idx")
    if len(abstain):
        out.add("full_kv", "none", ALWAYS_ABSTAIN, 0.0, "f1", boot.mean(abstain["f1"]))
        _rates(out, "full_kv", "none", ALWAYS_ABSTAIN, 0.0, abstain, boot)
    if sub is not None:
        out.delta("full_kv", "pair", "full", 1.0, "f1_main_minus_scout", sub, f1["main"].loc[answerable],
                  f1["scout"].loc[answerable])


def _transfer(out: _Table, answers: pd.DataFrame, boot: PassageBootstrap, table: str = "transfer") -> None:
    answers = answers[~answers["method"].isin(FLOOR_METHODS)]
    f1 = answers.set_index(["role", "method", "retention", "source", "sample_idx"])["f1"].sort_index()
    conditions = set(f1.index.droplevel("sample_idx"))
    methods = [m for m in answers["method"].unique() if m not in ("full", "random")]
    for r in sorted(answers.loc[answers["method"] != "full", "retention"].unique()):
        for role, other, direction in (("main", "scout", "forward"), ("scout", "main", "reverse")):
            random = f1.loc[(role, "random", r, "own")] if "random" in answers["method"].values else None
            full = answers[(answers["role"] == role) & (answers["method"] == "full")].set_index("sample_idx")["f1"]
            if random is not None:
                out.add(table, role, "random", r, "f1", boot.mean(random))
            for m in methods:
                own, moved = f1.loc[(role, m, r, "own")], f1.loc[(role, m, r, "transfer")]
                out.add(table, role, m, r, "f1_own", boot.mean(own))
                if (role, m, r, "own_per_head") in conditions:
                    per_head = f1.loc[(role, m, r, "own_per_head")]
                    out.add(table, role, m, r, "f1_own_per_head", boot.mean(per_head))
                    out.add(table, role, m, r, "delta_per_head_vs_shared", boot.delta(per_head, own))
                out.add(table, role, m, r, f"f1_from_{other}", boot.mean(moved))
                out.delta(table, role, m, r, f"delta_{direction}", boot, moved, own)
                out.delta(table, role, m, r, "delta_own_vs_full", boot, own, full)
                if random is not None:
                    out.delta(table, role, m, r, "delta_own_vs_random", boot, own, random)


def _overlap(out: _Table, overlaps: pd.DataFrame, boot: PassageBootstrap, table: str = "overlap") -> None:
    """Token-space overlap quantities and, for a pair whose tokenizers differ, the character-space ones."""
    characters = "char_overlap" in overlaps.columns
    for (m, r), group in overlaps.groupby(["method", "retention"]):
        g = group.set_index("sample_idx")
        for quantity in ("overlap", "jaccard", "spearman", "overlap_random", "jaccard_random",
                         *(CHARACTER_OVERLAP if characters else ())):
            out.add(table, "pair", m, r, quantity, boot.mean(g[quantity]))
        out.add(table, "pair", m, r, "overlap_minus_random", boot.delta(g["overlap"], g["overlap_random"]))
        if characters:
            out.add(table, "pair", m, r, "char_overlap_minus_random", boot.delta(*(g[q] for q in CHARACTER_OVERLAP)))


def _abstention(out: _Table, answers: pd.DataFrame, boot: PassageBootstrap) -> None:
    """Per pruned condition (and random): abstention on unanswerable, wrong abstentions and empty replies on
    answerable questions; quantities of a selection from the partner end in `_transfer`, per-head ones `_own_per_head`."""
    pruned = answers[~answers["method"].isin(("full", *FLOOR_METHODS))]
    for (role, m, r, source), g in pruned.groupby(["role", "method", "retention", "source"]):
        _rates(out, "abstention", role, m, r, g.set_index("sample_idx"), boot, "" if source == "own" else f"_{source}")


def _by_answerability(out: _Table, answers: pd.DataFrame, overlaps: pd.DataFrame, boot: PassageBootstrap) -> None:
    """The transfer table on answerable questions (the estimand; `transfer`), on every question (`transfer_all`,
    when some are unanswerable) and the overlap table on each kind."""
    impossible = answers.groupby("sample_idx")["is_impossible"].first().astype(bool)
    answerable = impossible.index[~impossible].to_numpy()
    if len(answerable):
        _transfer(out, answers[answers["sample_idx"].isin(answerable)], boot.subset(answerable))
    if not impossible.any():
        return
    _transfer(out, answers, boot, "transfer_all")
    if impossible.all():
        return
    for suffix, flag in SUBSETS:
        ids = impossible.index[impossible == flag].to_numpy()
        _overlap(out, overlaps[overlaps["sample_idx"].isin(ids)], boot.subset(ids), f"overlap_{suffix}")


def passages_of(answers: pd.DataFrame) -> pd.Series:
    """The passage of each answered sample, indexed by sample_idx."""
    if "passage" not in answers.columns:
        raise KvpipeError("answers table: no 'passage' column; rerun the selection stage")
    return answers.groupby("sample_idx")["passage"].first()


def aggregate(answers: pd.DataFrame, overlaps: pd.DataFrame, settings: SelectionSettings, margin: float) -> pd.DataFrame:
    """Tidy table (table, role, method, retention, quantity, value, ci_low, ci_high, p_value, verdict, p_holm);
    settings: the stage's (bootstrap, ci, seed); margin: the TOST equivalence margin (`verdicts.equivalence_margin`)."""
    answers = with_failure_flags(answers)
    boot = PassageBootstrap(passages_of(answers), settings.bootstrap, settings.ci, settings.seed)
    out = _Table(margin)
    _full_kv(out, answers, boot)
    _by_answerability(out, answers, overlaps, boot)
    _abstention(out, answers, boot)
    _overlap(out, overlaps, boot)
    agg = pd.DataFrame(out.rows, columns=["table", "role", "method", "retention", "quantity", "value", "ci_low",
                                          "ci_high", "p_value", "verdict"])
    agg["p_holm"] = holm(agg["p_value"].to_numpy(dtype=float))
    return _floored(agg)


def _floored(agg: pd.DataFrame) -> pd.DataFrame:
    """Every transfer delta of a model whose full context is not better than its no_context floor reads AT_FLOOR
    (kvpipe.estimands): its own and transferred selections cannot be told from broken ones."""
    floor = agg[(agg["table"] == "full_kv") & (agg["quantity"] == "delta_full_vs_no_context")]
    verdicts = dict(zip(floor["role"], floor["verdict"], strict=True))
    for role in ("scout", "main"):
        if not above_floor(verdicts.get(role)):
            judged = agg["table"].isin(("transfer", "transfer_all")) & (agg["role"] == role) & (agg["verdict"] != "")
            agg.loc[judged, "verdict"] = AT_FLOOR
    return agg

"""What every verdict is about, and the words it may use: answerable F1, abstention, floors, equivalence.

On SQuAD v2 an empty or abstaining reply scores F1 1 on every unanswerable question, so an
all-question F1 can be won by a cache that carries nothing. Answer quality is therefore judged on
answerable questions alone (`ANSWERABLE_F1`); what a condition does on unanswerable ones is
reported apart as abstention (`ABSTAIN_UNANSWERABLE`, and the wrong abstentions on answerable ones,
`ABSTAIN_ANSWERABLE`). Every condition stands beside floors that a broken cache cannot beat:

    no_context      the model answers with its template and the question, every context token evicted
    mean_kv         (projection) the context positions hold the main's calibration-mean key and value
    always_abstain  the constant abstention reply, no model at all

A paired difference is worded by `compare` and only so: "equivalent" only by a two one-sided test
(TOST: the 1 − 2α interval lies inside ± the configured margin, `verdicts.equivalence_margin`),
even when the two-sided interval excludes 0 (a difference smaller than the margin); else
"better" / "worse" when the two-sided interval at the stage's level excludes 0; otherwise
"undecided at this n", with the smallest |Δ| the n could tell from 0. A condition "carries
content" only when its answerable F1 is better than both floors that apply to it. A model whose
own full context is not better than its `no_context` floor cannot tell a good selection or cache
from a broken one: every delta of its conditions then reads "at the floor", never "equivalent"
(two conditions that both score 0 would otherwise be equivalent by construction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvpipe.stats import bootstrap_pvalue, critical_value, percentile_ci

ANSWERABLE_F1 = "answerable F1"
ABSTAIN_UNANSWERABLE = "abstention on unanswerable questions"
ABSTAIN_ANSWERABLE = "abstention on answerable questions"
SUBSETS = (("answerable", False), ("unanswerable", True))   # the kinds of question: (name, is_impossible)
NO_CONTEXT, MEAN_KV, ALWAYS_ABSTAIN = "no_context", "mean_kv", "always_abstain"
FLOORS = (NO_CONTEXT, MEAN_KV, ALWAYS_ABSTAIN)
BETTER, WORSE, EQUIVALENT, UNDECIDED = "better", "worse", "equivalent", "undecided"
AT_FLOOR = "at the floor"   # the model's own full context does not beat no_context: no delta of it is judged
VERDICTS = (BETTER, WORSE, EQUIVALENT, UNDECIDED, AT_FLOOR)


@dataclass(frozen=True)
class Comparison:
    """A paired difference (a − b) of one estimand with its interval, TOST interval, p-value and verdict."""

    estimand: str
    delta: float
    low: float
    high: float
    tost_low: float      # the 1 − 2α interval the equivalence test reads
    tost_high: float
    p_value: float
    detectable: float    # z × the bootstrap standard error: the smallest |Δ| this n tells from 0
    margin: float
    verdict: str

    def words(self, baseline: str) -> str:
        """The verdict in a sentence fragment, e.g. 'worse than main_full (Δ answerable F1 −0.300 [−0.41, −0.19])'."""
        d = f"Δ {self.estimand} {self.delta:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"
        if self.verdict == EQUIVALENT:
            return f"equivalent to {baseline} within ±{self.margin:g} (TOST; {d})"
        if self.verdict == UNDECIDED:
            return f"undecided against {baseline} at this n (detectable |Δ| ≈ {self.detectable:.3f}; {d})"
        return f"{self.verdict} than {baseline} ({d})"


def compare(point: float, replicates: np.ndarray, level: float, margin: float,
            estimand: str = ANSWERABLE_F1) -> Comparison:
    """Word a paired difference from its point estimate and bootstrap replicates (level: e.g. 0.95, α = 1 − level)."""
    reps = np.asarray(replicates, dtype=float)
    reps = reps[~np.isnan(reps)]
    if math.isnan(point) or len(reps) < 2:
        nan = math.nan
        return Comparison(estimand, point, nan, nan, nan, nan, nan, nan, margin, UNDECIDED)
    alpha = 1 - level
    low, high = (float(x) for x in percentile_ci(reps, level))
    tost_low, tost_high = (float(x) for x in percentile_ci(reps, 1 - 2 * alpha))
    p = float(bootstrap_pvalue(reps, point))
    detectable = critical_value(level) * float(np.std(reps, ddof=1))
    if -margin < tost_low and tost_high < margin:
        verdict = EQUIVALENT   # a difference inside the margin is equivalent even where the interval excludes 0
    elif low > 0 or high < 0:
        verdict = BETTER if low > 0 else WORSE
    else:
        verdict = UNDECIDED
    return Comparison(estimand, float(point), low, high, tost_low, tost_high, p, detectable, margin, verdict)


def carries_content(versus_floors: list[Comparison]) -> bool:
    """Whether a condition's answerable F1 is better than every floor it was compared with (none: False)."""
    return bool(versus_floors) and all(c.verdict == BETTER for c in versus_floors)


def above_floor(full_vs_no_context: str | None) -> bool:
    """Whether a model reads its context at all: its full-context answerable F1 is better than its no_context
    floor (the verdict of full − no_context). Without a floor row (a record that predates it) it is assumed."""
    return full_vs_no_context is None or full_vs_no_context == BETTER


def sample_line(n_questions: int, n_answerable: int, n_passages: int) -> str:
    """The n a verdict rests on, in words."""
    return (f"{n_answerable} answerable of {n_questions} questions on {n_passages} passages "
            f"({n_questions - n_answerable} unanswerable)")


def with_failure_flags(answers: pd.DataFrame) -> pd.DataFrame:
    """answers with `abstained` and `empty`; a record that predates them (its abstentions were stored as empty
    predictions) counts every empty prediction as an abstention and leaves `empty` unknown (NaN)."""
    if "abstained" in answers.columns:
        return answers
    return answers.assign(abstained=answers["prediction"].fillna("").str.strip().eq(""), empty=np.nan)

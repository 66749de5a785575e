"""SQuAD v2 exact match and F1 with the official answer normalisation, and scoring of a generation.

As in the official evaluation script, gold answers that normalise to the empty string are
dropped; a question left without gold answers is scored as unanswerable. On such a question an
empty or abstaining reply scores 1, so a broken cache that says nothing wins it: every reply is
therefore also classed (`Scored.abstained`: the reply is the abstention phrase; `Scored.empty`:
nothing but white space was generated) so that the analyses score answer quality on answerable
questions alone and report abstention apart (kvpipe.estimands).
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
UNANSWERABLE = "unanswerable"


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse white space (official script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def gold_texts(gold_answers: list[str]) -> list[str]:
    """The gold answers the official script scores against: those not empty once normalised, else [""]."""
    return [g for g in gold_answers if normalize_answer(g)] or [""]


def squad_exact(prediction: str, gold_answers: list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer; [] means unanswerable."""
    golds = gold_texts(gold_answers)
    return float(max(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def squad_f1(prediction: str, gold_answers: list[str]) -> float:
    """Best token-overlap F1 over the gold answers; [] means unanswerable (only "" scores 1)."""
    golds = gold_texts(gold_answers)
    return max(_f1(prediction, g) for g in golds)


@dataclass(frozen=True)
class Scored:
    """A reply as generated, the prediction scored from it, its EM and F1, and how it failed to answer, if it did."""

    reply: str
    prediction: str
    exact: float
    f1: float
    abstained: bool   # the reply is the abstention phrase (after normalisation)
    empty: bool       # nothing but white space was generated

    def columns(self) -> dict[str, Any]:
        """The answers-table columns of this reply."""
        return {"reply": self.reply, "prediction": self.prediction, "exact": self.exact, "f1": self.f1,
                "abstained": self.abstained, "empty": self.empty}


def score_reply(text: str, answers: list[dict[str, Any]]) -> Scored:
    """Score a generation against SQuAD answers: its first line, the abstention phrase mapped to the empty answer."""
    prediction = text.strip().splitlines()[0].strip() if text.strip() else ""
    abstained = normalize_answer(prediction) == UNANSWERABLE
    if abstained:
        prediction = ""
    golds = [a["text"] for a in answers]
    return Scored(text, prediction, squad_exact(prediction, golds), squad_f1(prediction, golds), abstained,
                  not text.strip())


def score_prediction(text: str, answers: list[dict[str, Any]]) -> tuple[str, float, float]:
    """(prediction, EM, F1) of a generation (score_reply without the failure flags)."""
    s = score_reply(text, answers)
    return s.prediction, s.exact, s.f1

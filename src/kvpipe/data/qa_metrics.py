"""SQuAD v2 exact match and F1 with the official answer normalisation, and scoring of a generation.

As in the official evaluation script, gold answers that normalise to the empty string are
dropped; a question left without gold answers is scored as unanswerable.
"""

from __future__ import annotations

import collections
import re
import string
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


def score_prediction(text: str, answers: list[dict[str, Any]]) -> tuple[str, float, float]:
    """First line of a generation, 'unanswerable' mapped to the empty answer; its EM and F1 against SQuAD answers."""
    prediction = text.strip().splitlines()[0].strip() if text.strip() else ""
    if normalize_answer(prediction) == UNANSWERABLE:
        prediction = ""
    golds = [a["text"] for a in answers]
    return prediction, squad_exact(prediction, golds), squad_f1(prediction, golds)

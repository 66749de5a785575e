"""Extra unlabeled passages for the distill objective: more training text than the calibration passages.

`distill.extra` names where they come from: the synthetic generator's passages (kvpipe.data.synthetic,
its own seed) or a text file of passages separated by blank lines. A passage that equals, contains or
is contained in any passage of the samples table (calibration or test) is dropped, so training text
never overlaps a test passage. Each kept passage gives one training sample (never a held-out one):
with `target: question` the main writes itself a question about the passage (greedy, the first line
of its reply) and the sample is that question's, teacher-forced on the main's own answer as for a
calibration question; with `target: continuation`, the passage's second half read from a cache of
its first half. The samples carry no gold answer: they add to the training loss only.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from kvpipe.data.prompt import build_prompt
from kvpipe.data.synthetic import generate
from kvpipe.errors import KvpipeError
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.models.load import LoadedModel
from kvpipe.projection.distill import DistillSample, continuation_sample, question_sample
from kvpipe.settings import ExtraPassages, ProjectionSettings

ASK_PROMPT = {"system": "You write reading-comprehension questions.", "user": "Passage:\n{context}\n\n{question}"}
ASK = "Write one short question that the passage answers. Reply with the question only."


def _normal(text: str) -> str:
    return " ".join(text.split())


def _overlaps(text: str, known: list[str]) -> bool:
    """Whether a passage equals, contains or is contained in a known one (white space normalised)."""
    t = _normal(text)
    return any(t in k or k in t for k in known)


def read_passages_file(path: Path) -> list[str]:
    """The passages of a UTF-8 text file, separated by blank lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KvpipeError(f"projection.distill.extra.path: cannot read {path}: {err}") from None
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def extra_passages(spec: ExtraPassages, known: list[str]) -> list[str]:
    """Up to spec.passages configured passages, in order, none overlapping a known passage."""
    if spec.source == "none":
        return []
    if spec.source == "synthetic":
        texts = list(dict.fromkeys(generate(seed=spec.seed, passages=spec.passages)["context"]))
    else:
        texts = read_passages_file(Path(spec.path))
    seen = [_normal(k) for k in known]
    return [t for t in texts if not _overlaps(t, seen)][: spec.passages]


def self_question(main: LoadedModel, passage: str, max_tokens: int) -> str:
    """The main's own question about a passage: the first line of its greedy reply ('' if none)."""
    tokens = build_prompt(main.tokenizer, ASK_PROMPT, passage, ASK)
    text = Session(main, tokens, 1).answer([AnswerRequest("ask")], max_tokens)[0].text.strip()
    return text.splitlines()[0].strip() if text else ""


def extra_samples(
    scout: LoadedModel, main: LoadedModel, prompt: dict[str, Any], cfg: ProjectionSettings, known: list[str]
) -> list[DistillSample]:
    """The training samples of the extra passages (a passage whose self-question is empty gives none)."""
    spec, top_k = cfg.distill.extra, cfg.distill.teacher_top_k
    out = []
    for passage in extra_passages(spec, known):
        if spec.target == "continuation":
            out.append(continuation_sample(scout, main, build_prompt(main.tokenizer, prompt, passage, ASK), top_k))
            continue
        question = self_question(main, passage, spec.question_tokens)
        if question:
            tokens = build_prompt(main.tokenizer, prompt, passage, question)
            out.append(question_sample(scout, main, tokens, (), cfg.max_new_tokens, top_k))
    return [dataclasses.replace(s, extra=True) for s in out]

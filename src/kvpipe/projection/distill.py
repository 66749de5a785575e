"""The `distill` objective: the frozen main model reads the projected cache and should behave as with its own.

A sample is one calibration prompt cut after a cache prefix: the scout's payload of the prefix, the
tokens after it and the main's own next-token log-probabilities over them (teacher: its own cache).
Question samples cut at the end of the context and continue with the question, the answer prompt
and the main's own greedy answer (teacher-forced); continuation samples (optional) cut the passage
halfway and continue with its second half. The loss is the mean over those tokens of
KL(p_own ‖ p_projected), the student distribution computed by the main from the projected prefix
cache; gradients flow through the main (whose parameters are frozen) into the projector only.
With a `top_k`, a sample keeps only the teacher's k most likely tokens per position (memory
m × k instead of m × vocabulary: bounded whatever the vocabulary) and the KL is that of both
distributions coarsened to those k tokens and the rest as one outcome: exact when the rest has
no teacher mass, a lower bound of the full KL otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from kvpipe.data.prompt import PromptTokens
from kvpipe.data.qa_metrics import score_prediction
from kvpipe.inference.cache_sources import ContextKV, GivenTensors, OwnPrefill
from kvpipe.inference.decode import decode
from kvpipe.inference.prune import prune_batch
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.models.load import LoadedModel
from kvpipe.projection.inject import ScoutPayload, project
from kvpipe.projection.projectors import Projector


@dataclass(frozen=True)
class DistillSample:
    """One prompt cut after `prefix` tokens: the scout's payload of the prefix, the tokens after it, the teacher."""

    payload: ScoutPayload
    after: torch.Tensor  # [m] token ids fed after the prefix cache
    teacher: torch.Tensor  # [m, vocab] or [m, k] the main's log-probabilities with its own cache (float32, CPU)
    tokens: PromptTokens | None  # the question prompt (None for continuation samples), for answer F1
    answers: tuple[str, ...] = ()  # gold answers (empty: unanswerable, or a continuation sample)
    hidden: torch.Tensor | None = None  # the scout's hidden states of the prefix (projected_hidden's distill)
    extra: bool = False  # from an extra unlabeled passage (kvpipe.projection.extra), not a calibration one
    teacher_ids: torch.Tensor | None = None  # [m, k] the tokens of a top-k teacher (None: the whole vocabulary)

    @property
    def prefix(self) -> int:
        return len(self.payload)

    @property
    def n_tokens(self) -> tuple[int, int]:
        """(prefix tokens the projector mapped, target tokens the loss covers)."""
        return self.prefix, len(self.after)

    @property
    def key(self) -> float:
        """A fingerprint of the training target (a checkpoint must have been made on the same targets)."""
        return float(self.teacher.sum())


@contextmanager
def frozen(lm: LoadedModel) -> Iterator[None]:
    """The model's parameters take no gradient within the block (their flags are restored after)."""
    flags = [p.requires_grad for p in lm.model.parameters()]
    for p in lm.model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(lm.model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@torch.no_grad()
def _teacher(main: LoadedModel, ids: np.ndarray, prefix: int, top_k: int | None) -> dict[str, torch.Tensor | None]:
    """The main's log-probabilities at tokens prefix..len(ids)-1 with its own cache: all, or the top k and their ids."""
    out = main.model(input_ids=torch.as_tensor(ids, device=main.device)[None], use_cache=False)
    logp = torch.log_softmax(out.logits[0, prefix:].float(), dim=-1).cpu()
    if top_k is None or top_k >= logp.shape[-1]:
        return {"teacher": logp, "teacher_ids": None}
    top = logp.topk(top_k, dim=-1)
    return {"teacher": top.values.contiguous(), "teacher_ids": top.indices.contiguous()}


def scout_payload(scout: LoadedModel, tokens: PromptTokens) -> ScoutPayload:
    """The scout's payload of the prompt up to the context's end (its own prefill)."""
    return ScoutPayload.from_context(scout, OwnPrefill(1).context_kv(scout, tokens))


def question_sample(
    scout: LoadedModel,
    main: LoadedModel,
    tokens: PromptTokens,
    answers: tuple[str, ...],
    max_new_tokens: int,
    top_k: int | None = None,
) -> DistillSample:
    """The sample of one question prompt: context cache, then question, answer prompt and the main's own answer."""
    own = Session(main, tokens, 1).answer([AnswerRequest("teacher")], max_new_tokens)[0].token_ids
    ids = np.concatenate([tokens.input_ids, np.asarray(own, dtype=np.int64)])
    end = tokens.context_end
    teacher = _teacher(main, ids, end, top_k)
    return DistillSample(scout_payload(scout, tokens), torch.as_tensor(ids[end:]), tokens=tokens, answers=answers, **teacher)


def continuation_sample(scout: LoadedModel, main: LoadedModel, tokens: PromptTokens, top_k: int | None = None) -> DistillSample:
    """The sample of one passage's continuation: the cache holds its first half, the target is the second."""
    cut = tokens.context_start + max(1, (tokens.context_end - tokens.context_start) // 2)
    head = dataclasses.replace(tokens, context_end=cut)
    ids = tokens.input_ids[: tokens.context_end]
    return DistillSample(scout_payload(scout, head), torch.as_tensor(ids[cut:]), tokens=None, **_teacher(main, ids, cut, top_k))


def model_cache(kv: ContextKV, main: LoadedModel) -> DynamicCache:
    """A batch-of-one model cache of a context KV (differentiable in it)."""
    pairs = zip(kv.keys, kv.values, strict=True)
    return DynamicCache(ddp_cache_data=[(k[None].to(main.dtype), v[None].to(main.dtype)) for k, v in pairs])


def log_probs_after(kv: ContextKV, after: torch.Tensor, main: LoadedModel) -> torch.Tensor:
    """The main's next-token log-probabilities [m, vocab] at the tokens `after` fed over the prefix cache kv."""
    n, m = len(kv), len(after)
    positions = torch.arange(n, n + m, device=main.device)
    out = main.model(
        input_ids=after.to(main.device)[None],
        position_ids=positions[None],
        use_cache=True,
        past_key_values=model_cache(kv, main),
        cache_position=positions,
    )
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def token_kl(teacher: torch.Tensor, student: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) per position [m] from log-probabilities: over the vocabulary, or (ids: the teacher's top k) over
    those k tokens and the rest as one outcome."""
    if ids is None:
        return (teacher.exp() * (teacher - student)).sum(-1)
    p, q = teacher.exp(), student.gather(1, ids)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - q.exp().sum(-1)).clamp_min(1e-12)
    return (p * (teacher - q)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()


def kl_after(kv: ContextKV, sample: DistillSample, main: LoadedModel) -> torch.Tensor:
    """Mean over the tokens after the prefix of KL(p_own ‖ p_student), the student reading the prefix from kv."""
    ids = None if sample.teacher_ids is None else sample.teacher_ids.to(main.device)
    return token_kl(sample.teacher.to(main.device), log_probs_after(kv, sample.after, main), ids).mean()


def distill_loss(projector: Projector, sample: DistillSample, layer_map: list[int], main: LoadedModel) -> torch.Tensor:
    """Mean over the tokens after the prefix of KL(p_own ‖ p_projected)."""
    return kl_after(project(projector, sample.payload, layer_map, main), sample, main)


@torch.no_grad()
def kv_f1(kv: ContextKV, sample: DistillSample, main: LoadedModel, max_new_tokens: int) -> float:
    """F1 of the main's greedy answer from a given context KV (question samples only)."""
    tokens = sample.tokens
    given = GivenTensors(kv).context_kv(main, tokens)
    batch = prune_batch(main, [(given, np.arange(tokens.context_end - tokens.context_start), tokens.context_start)])
    answer = decode(main, tokens, batch, max_new_tokens)[0][0]
    return score_prediction(answer.text, list(sample.answers))[2]


def answer_f1(projector: Projector, sample: DistillSample, layer_map: list[int], main: LoadedModel, max_new_tokens: int) -> float:
    """F1 of the main's greedy answer from the projected context cache (question samples only)."""
    with torch.no_grad():
        return kv_f1(project(projector, sample.payload, layer_map, main), sample, main, max_new_tokens)

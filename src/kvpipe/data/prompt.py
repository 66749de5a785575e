"""Chat-template prompts whose tokens are labelled template / context / question.

The prompt is rendered once with the model's chat template and tokenised once; each token
is labelled by the character span it covers. Spans are recorded on one character axis that
every model shares, whatever its chat template: the context's characters, then the question's
(numbered from len(context)); template tokens cover none (-1). kvpipe.alignment pairs the tokens
of two tokenizers by these spans. The context tokens form one contiguous block
and every question token comes after it, so a cache can be prefilled on the tokens up to
the end of the context, pruned, and then fed the rest without changing the tokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpipe.errors import KvpipeError

if TYPE_CHECKING:  # the workflow imports this module (via the KV store) to build its DAG: no transformers there
    from transformers import PreTrainedTokenizerBase

TEMPLATE, CONTEXT, QUESTION = 0, 1, 2
SEGMENT_NAMES = ("template", "context", "question")


@dataclass(frozen=True)
class PromptTokens:
    """A tokenised prompt with per-token segment labels and character offsets (context, then question)."""

    input_ids: np.ndarray      # int64 [T]
    segment: np.ndarray        # int8 [T]: TEMPLATE, CONTEXT or QUESTION
    char_start: np.ndarray     # int32 [T]: offset into the context, or len(context) + offset into the question;
    char_end: np.ndarray       # int32 [T]   -1 for template tokens
    context_start: int         # index of the first context token
    context_end: int           # one past the last context token: the question part starts here

    def __len__(self) -> int:
        return len(self.input_ids)

    def same_tokens(self, other: PromptTokens) -> bool:
        """Whether both prompts are the same tokens: the same ids covering the same characters."""
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("input_ids", "char_start", "char_end"))

    @property
    def context_spans(self) -> np.ndarray:
        """int64 [n_context, 2]: the character span of each context token."""
        ctx = slice(self.context_start, self.context_end)
        return np.stack([self.char_start[ctx], self.char_end[ctx]], axis=1).astype(np.int64)


def render(tokenizer: PreTrainedTokenizerBase, prompt: dict[str, Any], context: str, question: str) -> tuple[str, int, int]:
    """Render the chat prompt; return the text and the start offsets of context and question."""
    before, rest = prompt["user"].split("{context}")
    middle, after = rest.split("{question}")
    user = before + context + middle + question + after
    messages = [{"role": "system", "content": prompt["system"]}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    at = text.rfind(user)
    if at < 0:
        raise KvpipeError("prompt: the chat template altered the user message; cannot locate the context")
    return text, at + len(before), at + len(before) + len(context) + len(middle)


def build_prompt(tokenizer: PreTrainedTokenizerBase, prompt: dict[str, Any], context: str, question: str) -> PromptTokens:
    """Tokenise the chat prompt for (context, question) and label every token."""
    text, c0, q0 = render(tokenizer, prompt, context, question)
    c1, q1 = c0 + len(context), q0 + len(question)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    in_context = (starts < c1) & (ends > c0)
    in_question = (starts < q1) & (ends > q0)
    segment = np.where(in_context, CONTEXT, np.where(in_question, QUESTION, TEMPLATE)).astype(np.int8)
    ctx_idx = np.flatnonzero(in_context)
    if len(ctx_idx) == 0:
        raise KvpipeError("prompt: the context produced no tokens")
    if (np.diff(ctx_idx) != 1).any() or (in_context & in_question).any() or np.flatnonzero(in_question).min() <= ctx_idx[-1]:
        raise KvpipeError("prompt.user: context and question tokens overlap; separate them with text")
    n_ctx, n_q = len(context), len(question)   # the shared axis: context characters, then question characters
    char_start, char_end = (np.where(in_context, np.clip(x - c0, 0, n_ctx),
                                     np.where(in_question, n_ctx + np.clip(x - q0, 0, n_q), -1)).astype(np.int32)
                            for x in (starts, ends))
    return PromptTokens(np.asarray(enc["input_ids"], dtype=np.int64), segment, char_start, char_end,
                        int(ctx_idx[0]), int(ctx_idx[-1]) + 1)

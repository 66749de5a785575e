"""A session: one prompt of one model, its context KVs, and batched answering of conditions.

Protocol per (model, sample):
  1. the model prefills the prompt up to the end of the context, once (OwnPrefill); other
     context KVs (GivenTensors) may be added under their own names;
  2. per condition, the named context KV is pruned to the template plus the selected context
     tokens (with keep_template False: to the selected prefix tokens alone), the question part
     is fed after the pruning and the answer decoded greedily (kvpipe.inference.prune,
     kvpipe.inference.decode). Any list of conditions runs as one batch.
The question queries of a full-context row are captured for Q2C scores (capture_row).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvpipe.data.prompt import PromptTokens
from kvpipe.errors import KvpipeError
from kvpipe.inference.cache_sources import WINDOW, CacheSource, ContextKV, OwnPrefill
from kvpipe.inference.capture import QuestionCapture
from kvpipe.inference.decode import Answer, decode
from kvpipe.inference.prune import prune_batch
from kvpipe.inference.requests import AnswerRequest
from kvpipe.models.load import LoadedModel


class Session:
    """One model and one prompt; answers any number of conditions from its context KVs."""

    def __init__(self, lm: LoadedModel, tokens: PromptTokens, window: int = WINDOW) -> None:
        self.lm, self.tokens = lm, tokens
        self.contexts: dict[str, ContextKV] = {}
        self.add(OwnPrefill(window))
        self.question: QuestionCapture | None = None   # set by answer(..., capture_row=r)
        self.prune_seconds = 0.0   # time spent copying and pruning caches, summed over answer() calls

    def add(self, source: CacheSource, key: str | None = None) -> ContextKV:
        """Compute a source's context KV and keep it under `key` (default: the source's name)."""
        kv = source.context_kv(self.lm, self.tokens)
        self.contexts[source.name if key is None else key] = kv
        return kv

    @property
    def context(self) -> slice:
        """Cache indices of the context tokens."""
        return slice(self.tokens.context_start, self.tokens.context_end)

    @property
    def own(self) -> ContextKV:
        """The model's own prefill, with the window queries SnapKV scores need."""
        return self.contexts[OwnPrefill.name]

    def answer(self, conditions: Sequence[AnswerRequest], max_new_tokens: int, rerotate: bool = False,
               capture_row: int | None = None) -> list[Answer]:
        """Answer all conditions as one padded batch.

        With capture_row, the question queries of that row are kept in `question` for Q2C
        scoring (the row must keep the whole context).
        """
        if len({c.role for c in conditions}) > 1:
            raise KvpipeError(f"model {self.lm.slug}: one batch mixes the roles {sorted({c.role for c in conditions})}")
        missing = sorted({c.cache for c in conditions} - set(self.contexts))
        if missing:
            raise KvpipeError(f"model {self.lm.slug}: no context KV named {missing[0]!r} (have {', '.join(self.contexts)})")
        start, end = self.tokens.context_start, self.tokens.context_end
        rows = [(self.contexts[c.cache], c.indices(end - start), start) if c.keep_template
                else (self.contexts[c.cache], c.indices(end), 0) for c in conditions]
        started = time.perf_counter()
        batch = prune_batch(self.lm, rows, rerotate)
        self.prune_seconds += time.perf_counter() - started
        answers, capture = decode(self.lm, self.tokens, batch, max_new_tokens, rerotate, capture_row)
        if capture is not None:
            self.question = capture
        return answers

"""kvpipe's scout inside NVIDIA kvpress: `ScoutPress`, a press whose scores come from a second (smaller) model.

    from kvpipe.kvpress import ScoutPress            # pip install 'kvpipe[kvpress]'
    scout = load_model("results/models/qwen2.5-coder-0.5b", "cpu", "float32")
    pipe = pipeline("kv-press-text-generation", model=main_model, tokenizer=main_tokenizer)
    pipe(context, question=q, press=ScoutPress(scout=scout, method="q2c", question=q, compression_ratio=0.5))

While the main model prefills the context, the scout reads the same prefix (the main's token ids
when both share a tokenizer; else the text of those ids, re-tokenised, its scores carried to the
main's tokens by characters with kvpipe.alignment: a main token takes the highest score of the
scout tokens covering it) and scores every prefix position, template included, with a kvpipe
selection method. The main then keeps, per layer and KV head, the top int(|prefix| · (1 −
compression_ratio)) positions, as every kvpress ScorerPress does.

- method "snapkv": SnapKV's `kvpress` protocol on the scout (query-agnostic: the question is
  never seen); "q2c": question-to-context attention of the scout, query-aware, so it needs
  `question` (the pipeline feeds its question only after the prefill, where no press sees it).
- per_head: the scout's own (layer, KV head) scores go to the same layer and head of the main
  (the scout must have the main's layer and KV-head counts; with the scout equal to the main and
  method "snapkv" this is kvpress's SnapKVPress exactly); otherwise one score per position, the
  heads' mean summed over layers (the seeds' shared selection), broadcast to every layer and head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from kvpipe.alignment import align
from kvpipe.errors import KvpipeError
from kvpipe.inference.capture import capture_queries, rope_queries
from kvpipe.kv.checks import cache_layer
from kvpipe.models.load import LoadedModel
from kvpipe.scoring.methods import Q2C, ScoringInputs, SnapKV

try:
    from kvpress import ScorerPress
except ImportError as err:  # the optional dependency
    raise ImportError("kvpipe.kvpress needs NVIDIA kvpress: pip install 'kvpipe[kvpress]'") from err

METHODS = ("snapkv", "q2c")


def scout_inputs(scout: LoadedModel, ids: list[int], question: list[int], window: int) -> ScoringInputs:
    """One scout forward over prefix + question ids: what SnapKV (the prefix's last `window` queries) and Q2C (the
    question's queries) score the prefix positions [0, len(ids)) with."""
    t, nq = len(ids), len(question)
    full = torch.as_tensor(ids + question, device=scout.device)[None]
    with torch.inference_mode(), capture_queries(scout) as raw:
        cache = scout.model(input_ids=full, use_cache=True, logits_to_keep=1, past_key_values=DynamicCache()).past_key_values
    keys = [cache_layer(cache, layer)[0][0] for layer in range(len(cache.layers))]
    w = min(window, t)
    w_index = torch.arange(t - w, t, device=scout.device)
    q_index = torch.arange(t, t + nq, device=scout.device)
    window_queries = [rope_queries(scout, r[0][t - w : t], w_index, layer) for layer, r in enumerate(raw)]
    question_queries = [rope_queries(scout, r[0][t:], q_index, layer) for layer, r in enumerate(raw)] if nq else None
    scales = [float(layer.self_attn.scaling) for layer in scout.model.model.layers]
    return ScoringInputs(slice(0, t), 0, window_queries, w_index, question_queries, q_index if nq else None, keys, scales)


@dataclass
class ScoutPress(ScorerPress):
    """A kvpress press that keeps what a scout model's kvpipe scores choose (module docstring).

    scout: the scout (kvpipe.models.load.load_model); method: "snapkv" (query-agnostic) or "q2c"
    (query-aware: needs `question`); tokenizer: the main's, needed only when the scout's differs.
    """

    scout: LoadedModel | None = None
    method: str = "snapkv"
    compression_ratio: float = 0.0
    question: str | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    per_head: bool = False
    window: int = 64
    kernel: int = 5
    _scores: torch.Tensor | None = field(default=None, init=False, repr=False)
    _busy: bool = field(default=False, init=False, repr=False)  # the scout is reading (it may be the main itself)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scout is None:
            raise KvpipeError("ScoutPress: scout is required (a model loaded with kvpipe.models.load.load_model)")
        if self.method not in METHODS:
            raise KvpipeError(f"ScoutPress: method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "q2c" and not self.question:
            raise KvpipeError("ScoutPress: method q2c is query-aware and needs question")

    def scout_scores(self, ids: list[int]) -> torch.Tensor:
        """float64 scores of the main's prefix positions: [layers, kv_heads, T] (per_head) or [T]."""
        tok = self.scout.tokenizer
        same = self.tokenizer is None or self.tokenizer.get_vocab() == tok.get_vocab()
        text = None if same else self.tokenizer.decode(ids)
        scout_ids = ids if same else tok(text, add_special_tokens=False)["input_ids"]
        question = tok(self.question, add_special_tokens=False)["input_ids"] if self.question else []
        inputs = scout_inputs(self.scout, scout_ids, question, self.window)
        method = Q2C() if self.method == "q2c" else SnapKV(self.window, self.kernel, "avg", protocol="kvpress")
        heads = method.head_scores(inputs)
        if self.per_head:
            if not same:
                raise KvpipeError("ScoutPress: per_head needs the scout to share the main's tokenizer")
            return torch.as_tensor(heads)
        shared = method.score(inputs) if self.method == "q2c" else heads.mean(axis=1).sum(axis=0)
        if not same:
            shared = align(_spans(tok, text), _spans(self.tokenizer, text)).max_scores(shared)
        return torch.as_tensor(shared)

    def score(
        self,
        module: torch.nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """[1, kv_heads, T]: the scout's scores of this layer (per_head) or its shared scores on every head."""
        if self._scores is None:
            raise KvpipeError("ScoutPress: no prefill ids were seen (use the press as a context manager on the model)")
        s = self._scores[module.layer_idx] if self._scores.ndim == 3 else self._scores.expand(keys.shape[1], -1)
        if s.shape != keys.shape[1:3]:
            raise KvpipeError(
                f"ScoutPress: scout scores {tuple(s.shape)} do not fit the main's keys "
                f"{tuple(keys.shape[1:3])} (per_head needs equal layer and KV-head counts)"
            )
        return s[None].to(keys.device, torch.float32)

    def _see_ids(self, module: torch.nn.Module, args: tuple) -> None:
        ids = args[0]
        if ids.shape[1] > 1 and not self._busy:  # a prefill: score its ids once, for every layer
            self._busy = True
            try:
                self._scores = self.scout_scores(ids[0].tolist())
            finally:
                self._busy = False

    def forward_hook(self, module: torch.nn.Module, input: Any, kwargs: dict, output: Any) -> Any:
        """kvpress's compression, except during the scout's own forward."""
        return output if self._busy else super().forward_hook(module, input, kwargs, output)

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[None]:
        """kvpress's hooks, plus one on the embedding that hands the prefill's ids to the scout."""
        hook = model.get_input_embeddings().register_forward_pre_hook(self._see_ids)
        try:
            with super().__call__(model):
                yield
        finally:
            hook.remove()


def _spans(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """int64 [n, 2]: each token's character span in `text`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

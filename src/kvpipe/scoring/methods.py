"""Token-selection methods: one small class per method with a common `score` interface.

A selection is a set of *context* token positions shared by all layers and heads (what a
scout can send to another model); as an option for a model's own use, each (layer, KV head)
keeps its own top positions (`head_scores`, same budget per head). Template and question
tokens are never candidates.
Scores come from query states captured on the forward pass and the cached (post-RoPE)
keys; attention is only ever materialised for a few query rows against the prompt, so the
memory is O(queries x prompt) per layer, never O(prompt²).

For a layer l, query head h (in KV group g(h)), query row i at cache index t_i and key j:

    A[l, h, i, j] = softmax_j( q[l, h, i] · k[l, g(h), j] · c_l ),   j ≤ t_i

with c_l the layer's own attention scale (`self_attn.scaling`: 1/sqrt(d) unless the model says
otherwise, e.g. Gemma's query_pre_attn_scalar).

Q2C (question -> context), over the question tokens Q of the full-KV question pass:

    s_Q2C[l, g, j] = mean_{h ∈ g} Σ_{i ∈ Q} A[l, h, i, j]                for context j
    s_Q2C[j] = Σ_l mean_g s_Q2C[l, g, j]

SnapKV, over an observation window W of w query rows, by `protocol`:
  query_agnostic (as kvpress evaluates it): W = the last w context tokens of the prefill; the
    question is never seen. For a budget of k context tokens, w = min(window, n,
    max(1, ⌊max_window_fraction · k⌋)) and, with `keep_window`, the last ⌊max_window_fraction · k⌋
    (at most w) context tokens are always kept (+inf), so the window never fills more than that
    fraction of the budget and the rest is chosen by score. Without a budget, w = min(window, n).
  query_aware (as in the SnapKV paper): W = the last w = min(window, question tokens) question
    queries of the full-KV question pass; every context token is scored and none is forced.
  kvpress (NVIDIA kvpress's SnapKVPress exactly, kvpipe.scoring.snapkv_kvpress): W = the last
    `window` prefix tokens, no cap; every prefix token is a candidate, template included
    (`scope` "prefix": scores and selections index cache positions [0, context_end)).
The answering pass always feeds the question over the pruned cache.

    a[l, h, j] = Σ_{i ∈ W} A[l, h, i, j]                                 for context j ∉ W
    a[l, g, j] = reduce over the query heads h of KV group g (`head_reduce`: mean or max)
    p[l, g, j] = pool_k(a[l, g])[j]          (`pooling` avg or max over a 1-D window of
                                              `kernel` positions, stride 1, same length)
    s_SnapKV[j] = Σ_l reduce_g p[l, g, j]
    kept window tokens get +inf; other window tokens 0.

Random: s[j] ~ U(0, 1), seeded by (seed, sample), the same for every model of a pair.

Every method class registers itself in METHODS by name and builds itself from the
`selection` config section (`from_config`). Scores may depend on the budget k (`head_scores(inputs, k)`,
`budget_dependent`); `forced_positions(n, k)` names the positions a method keeps whatever the
scores (depending on n and k only, so shared by every model), which the overlap null needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kvpipe.errors import KvpipeError
from kvpipe.registry import Registered
from kvpipe.scoring import snapkv_kvpress

if TYPE_CHECKING:
    from kvpipe.inference.session import Session


@dataclass
class ScoringInputs:
    """What a method may look at for one (model, sample)."""

    context: slice                          # cache indices of the context tokens
    sample_idx: int
    window_queries: list[torch.Tensor]      # per layer [Hq, w, d], RoPE applied: last w prefix tokens
    window_index: torch.Tensor              # cache indices of those queries
    question_queries: list[torch.Tensor] | None   # per layer [Hq, nq, d], RoPE applied: question tokens
    question_index: torch.Tensor | None     # their cache indices
    keys: list[torch.Tensor]                # per layer [Hkv, T, d], post-RoPE, T ≥ every query index
    scales: list[float]                     # per layer: the attention scale of the model (self_attn.scaling)
    computed: dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_session(cls, session: Session, sample_idx: int) -> ScoringInputs:
        """The inputs of a session: its own prefill's window, and the question if its full-context answer captured
        it (capture_row; else question-aware methods cannot score and the keys are the prefill's)."""
        own, question = session.own, session.question
        if own.window_queries is None or own.window_index is None:
            raise ValueError("scoring needs the own prefill's window queries")
        scales = [float(layer.self_attn.scaling) for layer in session.lm.model.model.layers]
        if question is None:
            return cls(session.context, sample_idx, own.window_queries, own.window_index, None, None, own.keys, scales)
        return cls(session.context, sample_idx, own.window_queries, own.window_index, question.queries,
                   question.index, question.keys, scales)

    def scores(self, method: SelectionMethod, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A method's (shared [n_context], per-head [layers, kv_heads, n_context]) scores for a budget of k, computed
        once per (method name, k) — once in all for a method whose scores do not depend on the budget."""
        key = (method.name, k if method.budget_dependent else None)
        if key not in self.computed:
            heads = method.head_scores(self, key[1])
            self.computed[key] = (method.reduce_heads(heads).sum(axis=0), heads)
        return self.computed[key]

    def question(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The question's queries and cache indices (a question-aware method's input)."""
        if self.question_queries is None or self.question_index is None:
            raise ValueError("question-aware scoring needs a captured question pass (answer with capture_row)")
        return self.question_queries, self.question_index


def attention_rows(queries: torch.Tensor, keys: torch.Tensor, query_index: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention of a few queries [Hq, n, d] over keys [Hkv, T, d] -> [Hkv, Hq/Hkv, n, T]."""
    hkv, t, d = keys.shape
    q = queries.float().reshape(hkv, -1, queries.shape[1], d)
    logits = torch.einsum("gqnd,gtd->gqnt", q, keys.float()) * scale
    visible = torch.arange(t, device=keys.device)[None, :] <= query_index[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


METHODS: dict[str, type[SelectionMethod]] = {}


class SelectionMethod(Registered, ABC):
    """Scores context tokens; higher means keep.

    `head_scores` gives one score per (layer, KV head, context token); `score` reduces it to
    the shared selection a scout can send: reduce over heads, then sum over layers.
    Subclasses register in METHODS under `name`; `attention_based` ones score from attention rows.
    """

    registry = METHODS
    attention_based: ClassVar[bool]   # scores come from attention rows (checked against eager attention in the tests)
    budget_dependent: ClassVar[bool] = False   # scores change with the budget k

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SelectionMethod:
        """The method as the `selection` config section sets it up."""
        return cls()

    @abstractmethod
    def head_scores(self, inputs: ScoringInputs, k: int | None = None) -> np.ndarray:
        """float64 [layers, kv_heads, n_context], for a budget of k context tokens (None: no budget)."""

    @property
    def scope(self) -> str:
        """What scores index: "context" (context positions; the template is always kept) or "prefix" (cache
        positions [0, context_end): template tokens are candidates too)."""
        return "context"

    def forced_positions(self, n: int, k: int) -> np.ndarray:
        """Context positions always kept with a budget of k of n (+inf scores); none by default."""
        return np.empty(0, dtype=np.int64)

    def reduce_heads(self, scores: np.ndarray) -> np.ndarray:
        return scores.mean(axis=1)

    def score(self, inputs: ScoringInputs, k: int | None = None) -> np.ndarray:
        """One score per context token, float64 [n_context]."""
        return self.reduce_heads(self.head_scores(inputs, k)).sum(axis=0)


class Q2C(SelectionMethod):
    """Question-to-context attention, summed over question tokens, mean over a KV group's query heads."""

    name: ClassVar[str] = "q2c"
    attention_based: ClassVar[bool] = True

    def head_scores(self, inputs: ScoringInputs, k: int | None = None) -> np.ndarray:
        queries, index = inputs.question()
        layers = [attention_rows(q, k, index, c)[..., inputs.context].sum(dim=2).mean(dim=1)
                  for q, k, c in zip(queries, inputs.keys, inputs.scales, strict=True)]
        return torch.stack(layers).double().cpu().numpy()


@dataclass
class SnapKV(SelectionMethod):
    """Observation-window attention (end of the context, or end of the prompt), pooled along the sequence."""

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    head_reduce: str = "mean"
    keep_window: bool = True
    protocol: str = "query_agnostic"
    max_window_fraction: float = 0.5
    name: ClassVar[str] = "snapkv"
    attention_based: ClassVar[bool] = True
    budget_dependent: ClassVar[bool] = True

    # The two published settings: the SnapKV repository's LongBench configuration and
    # NVIDIA kvpress's SnapKVPress defaults (GQA groups averaged).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "original": {"window": 32, "kernel": 7, "pooling": "max", "head_reduce": "mean", "keep_window": True},
        "kvpress": {"window": 64, "kernel": 5, "pooling": "avg", "head_reduce": "mean", "keep_window": True},
    }

    def __post_init__(self) -> None:
        if self.protocol == "kvpress" and (self.pooling, self.head_reduce, self.keep_window) != ("avg", "mean", True):
            raise KvpipeError("selection.snapkv: protocol kvpress is kvpress's SnapKVPress: pooling avg, head_reduce "
                              "mean, keep_window true")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SnapKV:
        """The `selection.snapkv` preset with its overrides."""
        snap = cfg["snapkv"]
        return cls(**(cls.PRESETS[snap["preset"]] | {k: v for k, v in snap.items() if k != "preset"}))

    def plan(self, n: int, k: int | None, available: int) -> tuple[int, int]:
        """(observation rows w, forced context positions) for n context tokens, budget k, `available` captured rows."""
        if self.protocol == "query_aware":
            return min(self.window, available), 0
        cap = min(self.window, available, n)
        if k is None:
            return cap, cap if self.keep_window else 0
        limit = int(self.max_window_fraction * k)
        w = max(1, min(cap, limit))
        return w, min(w, limit) if self.keep_window else 0

    @property
    def scope(self) -> str:
        return "prefix" if self.protocol == "kvpress" else "context"

    def forced_positions(self, n: int, k: int) -> np.ndarray:
        """The kept tail of the observation window (query_agnostic with keep_window; kvpress: the window when k covers
        it, else none, as which window positions are kept then depends on the scores), else none."""
        if self.protocol == "kvpress":
            return np.arange(n - self.window, n) if k >= self.window else np.empty(0, dtype=np.int64)
        return np.arange(n - self.plan(n, k, self.window)[1], n)

    def reduce_heads(self, scores: np.ndarray) -> np.ndarray:
        return scores.max(axis=1) if self.head_reduce == "max" else scores.mean(axis=1)

    def head_scores(self, inputs: ScoringInputs, k: int | None = None) -> np.ndarray:
        if self.protocol == "kvpress":
            layers = [snapkv_kvpress.layer_scores(q, keys[:, : inputs.context.stop], self.window, self.kernel)
                      for q, keys in zip(inputs.window_queries, inputs.keys, strict=True)]
            return snapkv_kvpress.resolve_ties(torch.stack(layers), k).double().cpu().numpy()
        ctx = inputs.context
        n_ctx = ctx.stop - ctx.start
        aware = self.protocol == "query_aware"
        queries, index = inputs.question() if aware else (inputs.window_queries, inputs.window_index)
        w, forced = self.plan(n_ctx, k, queries[0].shape[1])
        scored = n_ctx if aware else n_ctx - w
        pad = self.kernel // 2
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        layers = []
        for q, keys, c in zip(queries, inputs.keys, inputs.scales, strict=True):
            attn = attention_rows(q[:, -w:], keys, index[-w:], c)[..., ctx.start:ctx.start + scored]
            per_head = attn.sum(dim=2)                                     # [Hkv, group, scored]
            a = per_head.amax(dim=1) if self.head_reduce == "max" else per_head.mean(dim=1)
            pooled = pool(F.pad(a[:, None], (pad, pad), mode="replicate"), self.kernel, stride=1)[:, 0, :scored]
            layers.append(pooled.cpu())
        scores = torch.stack(layers).double().numpy()
        tail = np.zeros(scores.shape[:2] + (n_ctx - scored,))
        tail[..., tail.shape[-1] - forced:] = np.inf
        return np.concatenate([scores, tail], axis=2)


@dataclass
class Random(SelectionMethod):
    """Uniform random scores, seeded per sample (identical for both models of a pair and all heads)."""

    seed: int = 0
    name: ClassVar[str] = "random"
    attention_based: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Random:
        """Seeded by `selection.seed`."""
        return cls(cfg["seed"])

    def head_scores(self, inputs: ScoringInputs, k: int | None = None) -> np.ndarray:
        n = inputs.context.stop - inputs.context.start
        shape = (len(inputs.keys), inputs.keys[0].shape[0], n)
        return np.broadcast_to(np.random.default_rng([self.seed, inputs.sample_idx]).random(n), shape).copy()


def build_methods(cfg: dict[str, Any]) -> list[SelectionMethod]:
    """The methods `selection.methods` names, each from its config (SnapKV: preset plus overrides)."""
    unknown = [name for name in cfg["methods"] if name not in METHODS]
    if unknown:
        raise KvpipeError(f"selection.methods: unknown method {unknown[0]!r}; known: {', '.join(sorted(METHODS))}")
    return [METHODS[name].from_config(cfg) for name in cfg["methods"]]


def top_k(scores: np.ndarray, retention: float) -> np.ndarray:
    """Sorted indices of the round(retention * n) highest scores on the last axis (at least 1; ties: earlier first).

    [n] scores give a shared selection [k]; [layers, heads, n] give per-head selections [layers, heads, k].
    """
    return top_n(scores, max(1, int(round(retention * scores.shape[-1]))))


def top_n(scores: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k highest scores on the last axis (ties: earlier first)."""
    return np.sort(np.argsort(-scores, axis=-1, kind="stable")[..., :k], axis=-1)

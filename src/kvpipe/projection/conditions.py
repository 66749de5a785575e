"""The ways the main model gets its context, one type each, registered in CONDITIONS by table name.

Every condition plans rows (Plan): which context KV the main starts from (its own prefill, or a
cache built from the scout's payload), which context tokens it keeps, how many bytes crossed the
network for it (kvpipe.projection.payload), and what its time to first token waits for (the
scout's side, the main's own prefill). The question is then fed at its original positions over
the pruned cache and answered greedily (kvpipe.inference.session), the selection stage's
leakage-free protocol.

The chat template before the context is the same for every question: the main prefills it once
per deployment and every given cache keeps those rows of its own (SampleInputs.own_template), so
no condition sends it and only context rows are projected, averaged or counted in bytes. The
floors a broken cache cannot beat (kvpipe.estimands) are conditions too: `no_context` (every
context token evicted), `mean_kv` (the context positions hold the calibration mean) and
`always_abstain` (a constant reply, no model).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kvpipe.data.prompt import PromptTokens
from kvpipe.data.qa_metrics import UNANSWERABLE
from kvpipe.inference.cache_sources import ContextKV
from kvpipe.models.load import LoadedModel
from kvpipe.projection.inject import ScoutPayload, mean_context, mixed, project
from kvpipe.projection.payload import index_bytes, kv_bytes, text_bytes
from kvpipe.projection.projectors import Projector
from kvpipe.registry import Registered
from kvpipe.settings import ProjectionSettings


@dataclass(frozen=True)
class Variant:
    """A row's identity in the tables."""

    condition: str
    projector: str = "none"
    objective: str = "none"
    key_map: str = "none"
    retention: float = 1.0
    rank: int = -1            # chain: SVD rank per layer and kind (-1: none)
    bottom_layers: int = -1   # own_bottom_projected_top: B, the main's own bottom layers (-1: none)
    hidden_layer: int = -1    # projected_hidden: L, the main layer the mapped hidden states enter (-1: none)

    @property
    def label(self) -> str:
        return "/".join(str(v) for v in (self.condition, self.projector, self.objective, self.key_map,
                                          f"{self.retention:g}", self.rank, self.bottom_layers, self.hidden_layer))


@dataclass(frozen=True)
class Plan:
    """One row to answer: where its cache comes from, what it keeps, what it cost to send, what it waits for."""

    variant: Variant
    build: Callable[[], ContextKV] | None   # the given cache (None: the main's own prefill)
    selection: np.ndarray | None             # context-relative kept tokens (None: all)
    bytes: int
    own_prefill: bool                        # the main prefills the context itself (counts in TTFT)
    uses_scout: bool = True                  # the scout's side (prefill, selection, payload) comes first
    reply: str | None = None                 # a constant reply: no model answers (always_abstain)


@dataclass
class SampleInputs:
    """Everything a condition may use for one test sample."""

    tokens: PromptTokens
    context: str
    payload: ScoutPayload
    own: ContextKV
    projectors: dict[tuple[str, str], Projector]   # (kind, objective) -> fitted projector
    layer_map: list[int]
    main: LoadedModel
    means: dict[str, torch.Tensor]
    selections: dict[float, np.ndarray]            # the scout's selection (chain.method) per retention below 1
    settings: ProjectionSettings
    memo: dict[tuple, ContextKV] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)   # e.g. "hidden": (scout, HiddenMap) for projected_hidden

    @property
    def n_context(self) -> int:
        return self.tokens.context_end - self.tokens.context_start

    @property
    def widths(self) -> list[int]:
        """Row width of every scout layer the layer map sends."""
        return [self.payload.values[s].shape[1] for s in sorted(set(self.layer_map))]

    def projected(self, projector: str, objective: str, key_map: str = "pre_rope",
                  payload: ScoutPayload | None = None) -> ContextKV:
        """The projected cache (memoised for the whole payload until clear())."""
        key = (projector, objective, key_map)
        if payload is not None:
            return self._project(key, payload)
        if key not in self.memo:
            self.memo[key] = self._project(key, self.payload)
        return self.memo[key]

    def _project(self, key: tuple[str, str, str], payload: ScoutPayload) -> ContextKV:
        with torch.inference_mode():
            return self.own_template(project(self.projectors[key[:2]], payload, self.layer_map, self.main, key[2]))

    def own_template(self, kv: ContextKV) -> ContextKV:
        """A given cache with the template rows replaced by the main's own (prefilled once per deployment)."""
        t = self.tokens.context_start

        def spliced(given: list[torch.Tensor], own: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.cat([o[:, :t].to(g.dtype), g[:, t:]], dim=1) for g, o in zip(given, own, strict=True)]

        return ContextKV(spliced(kv.keys, self.own.keys), spliced(kv.values, self.own.values), kv.positions)

    def mean(self) -> ContextKV:
        """The calibration-mean cache at the context positions, the main's own template rows before them."""
        return self.own_template(mean_context(self.means, self.main, self.payload.positions))

    def clear(self) -> None:
        """Forget memoised caches (so a timed build computes everything it needs)."""
        self.memo.clear()

    def kept(self, retention: float) -> np.ndarray:
        """Cache indices of the context rows sent at a retention: the scout's selection (all at 1)."""
        sel = np.arange(self.n_context) if retention >= 1 else self.selections[retention]
        return self.tokens.context_start + sel


CONDITIONS: dict[str, type[Condition]] = {}


class Condition(Registered, ABC):
    """A way of giving the main model its context; plans one row per variant."""

    registry = CONDITIONS

    @abstractmethod
    def plans(self, s: SampleInputs) -> list[Plan]:
        """The rows of this condition for one sample."""


class MainFull(Condition):
    """The main model's own prefill of the context: what sending the text buys."""

    name: ClassVar[str] = "main_full"

    def plans(self, s: SampleInputs) -> list[Plan]:
        return [Plan(Variant(self.name), None, None, text_bytes(s.context), True, uses_scout=False)]


class NoContext(Condition):
    """Floor: the main answers from its template and the question, every context token evicted (what it knows)."""

    name: ClassVar[str] = "no_context"

    def plans(self, s: SampleInputs) -> list[Plan]:
        return [Plan(Variant(self.name), None, np.zeros(0, dtype=np.int64), 0, False, uses_scout=False)]


class AlwaysAbstain(Condition):
    """Floor: the constant abstention reply, whatever the context (what abstaining alone scores)."""

    name: ClassVar[str] = "always_abstain"

    def plans(self, s: SampleInputs) -> list[Plan]:
        return [Plan(Variant(self.name), None, None, 0, False, uses_scout=False, reply=UNANSWERABLE)]


class ProjectedKV(Condition):
    """Projected keys and values replace the main's context KV (each projector, objective; post-RoPE comparison)."""

    name: ClassVar[str] = "projected_kv"

    def plans(self, s: SampleInputs) -> list[Plan]:
        size = kv_bytes(s.n_context, s.widths)
        out = [Plan(Variant(self.name, p, o, "pre_rope"), lambda p=p, o=o: s.projected(p, o), None, size, False)
               for p, o in s.projectors]
        if s.settings.post_rope_comparison and ("ridge", "reconstruction") in s.projectors:
            out.append(Plan(Variant(self.name, "ridge", "reconstruction", "post_rope"),
                            lambda: s.projected("ridge", "reconstruction", "post_rope"), None, size, False))
        return out


class ProjectedKOwnV(Condition):
    """Key-only transfer: projected keys with the main's own values."""

    name: ClassVar[str] = "projected_k_own_v"

    def plans(self, s: SampleInputs) -> list[Plan]:
        size = kv_bytes(s.n_context, s.widths, kinds=1)
        return [Plan(Variant(self.name, p, o, "pre_rope"), lambda p=p, o=o: mixed(s.projected(p, o), s.own), None,
                     size, True) for p, o in s.projectors]


class OwnKProjectedV(Condition):
    """The asymmetry's control: the main's own keys with projected values."""

    name: ClassVar[str] = "own_k_projected_v"

    def plans(self, s: SampleInputs) -> list[Plan]:
        size = kv_bytes(s.n_context, s.widths, kinds=1)
        return [Plan(Variant(self.name, p, o, "none"), lambda p=p, o=o: mixed(s.own, s.projected(p, o)), None,
                     size, True) for p, o in s.projectors]


class MeanKV(Condition):
    """Floor: the main's calibration-mean key and value at every context position, its own template before them."""

    name: ClassVar[str] = "mean_kv"

    def plans(self, s: SampleInputs) -> list[Plan]:
        return [Plan(Variant(self.name), s.mean, None, 0, False, uses_scout=False)]


class ScoutSelection(Condition):
    """The main prefills itself and keeps the scout's selection (only indices are sent with the text)."""

    name: ClassVar[str] = "scout_selection"

    def plans(self, s: SampleInputs) -> list[Plan]:
        text = text_bytes(s.context)
        return [Plan(Variant(self.name, retention=r), None, s.selections[r],
                     text + index_bytes(s.selections[r], s.n_context), True)
                for r in sorted(s.settings.retention) if r < 1]


class Chain(Condition):
    """Scout selection (chain.method) at r, rank-k SVD of the kept scout KV, projection, injection of the kept positions."""

    name: ClassVar[str] = "chain"

    def plans(self, s: SampleInputs) -> list[Plan]:
        chain = s.settings.chain
        p, o = chain.projector, chain.objective
        out = []
        for r in chain.retention:
            kept = s.kept(r)
            sel = None if r >= 1 else s.selections[r]
            extra = 0 if sel is None else index_bytes(sel, s.n_context)
            for rank in chain.rank:
                k = None if rank == "full" else int(rank)
                out.append(Plan(Variant(self.name, p, o, "pre_rope", r, -1 if k is None else k),
                                lambda kept=kept, k=k: s.projected(p, o, payload=s.payload.truncated(kept, k)),
                                sel, kv_bytes(len(kept), s.widths, rank=k) + extra, False))
        return out


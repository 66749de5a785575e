"""Hybrid caches: the main computes part of its context cache itself and takes the rest from the scout.

Registered in CONDITIONS (kvpipe.projection.conditions), each with its bytes and time to first
token (every build below is timed; only `fused` adds the main's full own prefill). They use the
projector and objective of `hybrid` (`fused` its trained fuser). A row's B is in its
`bottom_layers` column, its L in `hidden_layer` (kvpipe.projection.conditions.Variant).

    own_bottom_projected_top   the main's own prefill through its bottom B layers, projected KV above
                               (B = round(f · layers) for f in hybrid.bottom_fractions); sends the
                               text and the scout KV of the layers above B
    projected_hidden           the scout's hidden states entering scout layer layer_map[L], mapped into
                               the main's residual stream at layer L (kvpipe.projection.hidden), from
                               which the main computes its own KV of layers L..; projected KV below L
    projected_kv_refresh       projected KV of the whole context, then the main's own prefill of the
                               template and the scout's selection (chain.method) at each `retention` (causal
                               among the refreshed tokens, at their positions) overwrites those entries;
                               sends the scout KV, the selected tokens' text and their indices
    fused                      the main prefills itself and each context head is fused with the projected
                               cache by the fuser's gates, own + g_h (projected − own), the fuser a gated
                               projector trained on the main's next-token loss (kvpipe.projection.fuser)
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from transformers import DynamicCache

from kvpipe.inference.cache_sources import ContextKV
from kvpipe.kv.checks import cache_layer
from kvpipe.projection.conditions import Condition, Plan, SampleInputs, Variant
from kvpipe.projection.fuser import OBJECTIVE, fuse
from kvpipe.projection.hidden import hidden_states, main_bottom, main_from_layer
from kvpipe.projection.payload import FLOAT16, index_bytes, kv_bytes, text_bytes


def _widths(s: SampleInputs, layers: range) -> list[int]:
    """Row widths of the scout layers that feed the given main layers."""
    return [s.payload.values[sl].shape[1] for sl in sorted({s.layer_map[j] for j in layers})]


def _replace(base: ContextKV, layers: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> ContextKV:
    """base with the given layers' keys and values replaced."""
    keys = [layers[j][0] if j in layers else k for j, k in enumerate(base.keys)]
    values = [layers[j][1] if j in layers else v for j, v in enumerate(base.values)]
    return ContextKV(keys, values, base.positions)


class OwnBottomProjectedTop(Condition):
    """The main's own prefill through its bottom B layers, projected KV for the layers above."""

    name: ClassVar[str] = "own_bottom_projected_top"

    def plans(self, s: SampleInputs) -> list[Plan]:
        h = s.settings.hybrid
        p, o, n_layers = h.projector, h.objective, len(s.layer_map)
        bottoms = sorted({round(f * n_layers) for f in h.bottom_fractions})

        def build(b: int) -> ContextKV:
            return _replace(s.projected(p, o), dict(enumerate(main_bottom(s.main, s.tokens, b))))

        return [
            Plan(
                Variant(self.name, p, o, "pre_rope", bottom_layers=b),
                lambda b=b: build(b),
                None,
                text_bytes(s.context) + kv_bytes(s.n_context, _widths(s, range(b, n_layers))),
                False,
            )
            for b in bottoms
        ]


class ProjectedHidden(Condition):
    """The scout's hidden states mapped into the main's residual stream at layer L; projected KV below L."""

    name: ClassVar[str] = "projected_hidden"

    def plans(self, s: SampleInputs) -> list[Plan]:
        if "hidden" not in s.extras:
            return []
        scout, hmap = s.extras["hidden"]
        h = s.settings.hybrid
        p, o, layer = h.projector, h.objective, hmap.main_layer
        scout_hidden = hidden_states(scout, s.tokens, hmap.scout_layer)  # part of the payload: not timed

        def build() -> ContextKV:
            with torch.inference_mode():
                own = main_from_layer(s.main, s.tokens, layer, hmap(scout_hidden))
            return _replace(s.projected(p, o), {layer + i: kv for i, kv in enumerate(own)})

        size = len(s.payload) * scout_hidden.shape[1] * FLOAT16 + kv_bytes(len(s.payload), _widths(s, range(layer)))
        return [Plan(Variant(self.name, p, o, "pre_rope", hidden_layer=layer), build, None, size, False)]


def _refresh(s: SampleInputs, base: ContextKV, kept: np.ndarray) -> ContextKV:
    """base with the entries at cache indices `kept` replaced by the main's own prefill of those tokens."""
    index = torch.as_tensor(kept, device=s.main.device)
    cache = DynamicCache()
    with torch.inference_mode():
        s.main.model(
            input_ids=torch.as_tensor(s.tokens.input_ids[kept], device=s.main.device)[None],
            position_ids=index[None],
            cache_position=torch.arange(len(kept), device=s.main.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    keys, values = [], []
    for j, (k, v) in enumerate(zip(base.keys, base.values, strict=True)):
        own_k, own_v = cache_layer(cache, j)
        k, v = k.clone().float(), v.clone().float()
        k[:, index], v[:, index] = own_k[0].float(), own_v[0].float()
        keys.append(k)
        values.append(v)
    return ContextKV(keys, values, base.positions)


class ProjectedKVRefresh(Condition):
    """Projected KV for the whole context plus the main's own prefill of the scout's top-r selection."""

    name: ClassVar[str] = "projected_kv_refresh"

    def plans(self, s: SampleInputs) -> list[Plan]:
        h = s.settings.hybrid
        p, o = h.projector, h.objective
        sent = kv_bytes(len(s.payload), s.widths)
        out = []
        for r in sorted(r for r in s.settings.retention if r < 1):
            kept, sel = s.kept(r), s.selections[r]
            c0, c1 = s.tokens.char_start[s.tokens.context_start + sel], s.tokens.char_end[s.tokens.context_start + sel]
            text = sum(text_bytes(s.context[a:b]) for a, b in zip(c0, c1, strict=True))
            out.append(
                Plan(
                    Variant(self.name, p, o, "pre_rope", r),
                    lambda kept=kept: _refresh(s, s.projected(p, o), kept),
                    None,
                    sent + text + index_bytes(sel, s.n_context),
                    False,
                )
            )
        return out


class Fused(Condition):
    """The main's own cache fused per head with the projected cache by the trained fuser (kvpipe.projection.fuser)."""

    name: ClassVar[str] = "fused"

    def plans(self, s: SampleInputs) -> list[Plan]:
        if "fuser" not in s.extras:
            return []
        fuser = s.extras["fuser"]

        def build() -> ContextKV:
            with torch.inference_mode():
                return fuse(fuser, s.payload, s.own, s.layer_map, s.main, s.tokens.context_start)

        size = text_bytes(s.context) + kv_bytes(s.n_context, s.widths)
        return [Plan(Variant(self.name, "gated", OBJECTIVE, "pre_rope"), build, None, size, True)]

"""Pruned caches in one batch: each row keeps its first `start` entries (the template) plus its selection of the
entries after them, left-aligned (start 0: the selection alone, template entries evictable, as kvpress).

Rows may start from different context KVs of the same model. Row r holds its kept entries
left-aligned and padded to the longest row; the key mask hides the padding. With `rerotate`
the kept keys are moved from their RoPE positions to contiguous positions 0..n-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from kvpipe.inference.cache_sources import ContextKV
from kvpipe.models.load import LoadedModel
from kvpipe.models.rope import apply_rope, invert_rope, layer_rope_tables


@dataclass(frozen=True)
class PrunedBatch:
    """A batch of pruned caches with its key mask [batch, length] and each row's kept length."""

    cache: DynamicCache
    mask: torch.Tensor
    kept: list[int]

    @property
    def length(self) -> int:
        return max(self.kept)


def kept_index(selection: np.ndarray, layer: int, heads: int, start: int, device: torch.device) -> torch.Tensor:
    """Cache indices [heads, n] a row keeps at a layer: entries 0..start-1, then its sorted selection (relative to start)."""
    sel = selection if selection.ndim == 1 else selection[layer]
    context = torch.as_tensor(start + np.sort(sel, axis=-1), device=device)
    context = context.expand(heads, -1) if context.ndim == 1 else context
    prefix = torch.arange(start, device=device).expand(heads, -1)
    return torch.cat([prefix, context], dim=1)


def prune_batch(lm: LoadedModel, rows: Sequence[tuple[ContextKV, np.ndarray, int]], rerotate: bool = False) -> PrunedBatch:
    """One padded batch from (context KV, selection, start: the leading entries always kept) rows."""
    kept = [start + sel.shape[-1] for _, sel, start in rows]
    length, batch = max(kept), len(rows)
    mask = torch.zeros(batch, length, dtype=torch.long, device=lm.device)
    for r, n in enumerate(kept):
        mask[r, :n] = 1
    tables = None
    if rerotate:  # tables cover every stated position and every position 0..n-1 a row moves to
        size = max(max(len(kv), int(kv.positions.max()) + 1) for kv, _, _ in rows)
        tables = layer_rope_tables(lm.model, torch.arange(size, device=lm.device))
    layers = []
    for layer in range(len(rows[0][0].keys)):
        first = rows[0][0]
        heads, d, dv = first.keys[layer].shape[0], first.keys[layer].shape[2], first.values[layer].shape[2]
        kb = first.keys[layer].new_zeros((batch, heads, length, d))
        vb = first.values[layer].new_zeros((batch, heads, length, dv))
        for r, (kv, sel, start) in enumerate(rows):
            idx = kept_index(sel, layer, heads, start, lm.device)              # [heads, n]
            k = torch.gather(kv.keys[layer], 1, idx[..., None].expand(-1, -1, d))
            if tables is not None:  # move kept keys to positions 0..n-1
                cos, sin = tables[layer]
                pos, n = kv.positions[idx], idx.shape[1]
                k = apply_rope(invert_rope(k.float(), cos[pos], sin[pos]), cos[:n], sin[:n]).to(k.dtype)
            kb[r, :, : idx.shape[1]] = k
            vb[r, :, : idx.shape[1]] = torch.gather(kv.values[layer], 1, idx[..., None].expand(-1, -1, dv))
        layers.append((kb, vb))
    return PrunedBatch(DynamicCache(ddp_cache_data=layers), mask, kept)

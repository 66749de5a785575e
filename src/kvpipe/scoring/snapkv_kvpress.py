"""SnapKV's `kvpress` protocol: NVIDIA kvpress's SnapKVPress (0.5.5), position for position.

Over the whole prefilled prefix P = [0, context_end) (chat template included, so template tokens
are evictable), with the last w = `window` prefix tokens as the observation window (no cap):

    A[l, h, i, j] = softmax_j( q[l, h, i] · k[l, g(h), j] / sqrt(d) ),  j ≤ t_i (every key of P)
    a[l, h, j]    = mean_{i ∈ W} A[l, h, i, j]                            for j < |P| − w
    p[l, h]       = avg_pool1d(a[l, h], kernel, padding kernel // 2)       (zero padding, divisor kernel)
    s[l, g, j]    = mean_{h ∈ g} p[l, h, j];  window positions +inf

Each (layer, KV head) keeps its own top n = max(1, ⌊|P| · (1 − compression_ratio)⌋) positions
(`kvpress_budget`). The operations follow kvpress's order (divide by sqrt(d), not the model's
`scaling`; pool per query head, then average the group) so that the scores order the positions
as kvpress's do (in float32 they are the same numbers). Ties at the cut (the window's +inf when n is
below the window) are broken as torch.topk breaks them, as in kvpress (its choice among equal scores
is a function of the scores' order alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvpipe.errors import KvpipeError


def kvpress_budget(retention: float, prefix: int) -> int:
    """Positions kept of a prefix of `prefix` tokens, as kvpress counts them for compression_ratio 1 − retention."""
    return max(1, int(prefix * (1 - (1 - retention))))


def layer_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """float32 [Hkv, T] for window queries [Hq, ≥window, d] (RoPE applied, the last prefix tokens) and keys [Hkv, T, d]."""
    hkv, t, d = keys.shape
    if queries.shape[1] < window or t <= window:
        raise KvpipeError(
            f"snapkv protocol kvpress: needs {window} window queries and a longer prefix "
            f"(have {queries.shape[1]} queries, {t} prefix tokens)"
        )
    q = queries[:, -window:].float()[None]  # [1, Hq, w, d]
    k = keys.float().repeat_interleave(q.shape[1] // hkv, dim=0)[None]  # [1, Hq, T, d]
    logits = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
    logits += torch.triu(torch.full_like(logits, float("-inf")), diagonal=t - window + 1)
    attn = torch.softmax(logits, dim=-1, dtype=torch.float32)[..., :-window]
    pooled = F.avg_pool1d(attn.mean(dim=-2), kernel_size=kernel, padding=kernel // 2, stride=1)
    grouped = pooled.view(hkv, -1, t - window).mean(dim=1)
    return F.pad(grouped, (0, window), value=float("inf"))


def resolve_ties(scores: torch.Tensor, n: int | None) -> torch.Tensor:
    """With a budget n, the positions torch.topk leaves out that score as high as its lowest kept one (ties at the
    cut; the window when n is below it) score −1, below every score, so that the top n are exactly torch.topk's."""
    if n is None:
        return scores
    top = scores.topk(n, dim=-1)
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, True)
    return scores.masked_fill(~kept & (scores >= top.values.min(dim=-1, keepdim=True).values), -1.0)

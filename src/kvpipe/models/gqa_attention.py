"""Scaled dot-product attention for grouped-query attention under a mask, without copying the cache per query head.

transformers' `sdpa` path drops torch's grouped-query option (`enable_gqa`) whenever an attention mask is
given (on CPU and CUDA) and repeats every key and value head once for each query head it serves instead:
a copy of the whole cache, `num_key_value_groups` times, at every layer and decoding step. kvpipe's batches of pruned caches
always carry a mask (their rows differ in length), so on long contexts answering spent much of its
time copying. `folded_sdpa` instead folds the g query heads of each key/value head into the query
axis — the same products against the same keys and values, the mask repeated per group — and calls
torch's SDPA once. Without a mask, or without groups, it is transformers' own `sdpa` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvpipe_sdpa"


def folded_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """Attention output [batch, queries, heads, head_dim] (transformers' attention-function interface)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or attention_mask.shape[1] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.reshape(batch, kv_heads, groups * queries, dim)   # head h = kv_head * groups + j -> row j * queries + q
    mask = attention_mask[:, :, :, : key.shape[-2]]
    if queries > 1:   # one row per (group, query): a mask broadcast over the queries is spelled out first
        mask = mask.expand(-1, -1, queries, -1).repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, queries, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, folded_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)

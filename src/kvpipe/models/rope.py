"""Rotary position embedding: apply and exactly undo it, with the model's own frequencies.

RoPE rotates each pair of key dimensions (i, i + d/2) by angle position * inv_freq[i]:

    k_rot = k * cos + rotate_half(k) * sin,      rotate_half([a, b]) = [-b, a]

cos and sin come from the model's rotary module (so rope_scaling variants are honoured)
and may carry an attention scale s (cos = s cos θ, sin = s sin θ). Since rotate_half is
a rotation by 90° in each pair, the inverse is the rotation by -θ divided by s²:

    k = (k_rot * cos - rotate_half(k_rot) * sin) / (cos² + sin²)

Layers may differ: Gemma 3's sliding-window layers rotate with `rotary_emb_local`
(rope_local_base_freq, 10k) and its full-attention layers with `rotary_emb` (rope_theta, 1M),
so such a model's tables are asked for per layer.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvpipe.errors import KvpipeError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(model: PreTrainedModel, layer: int | None) -> torch.nn.Module | None:
    """The rotary module of `layer`: `rotary_emb_local` for a sliding-window layer of a model that has one."""
    inner = getattr(model, "model", model)
    local = getattr(inner, "rotary_emb_local", None)
    if local is None:
        return getattr(inner, "rotary_emb", None)
    if layer is None:
        raise KvpipeError(f"{type(model).__name__}: its layers use different RoPE tables; pass the layer")
    return local if model.config.layer_types[layer] == "sliding_attention" else inner.rotary_emb


def rope_tables(model: PreTrainedModel, positions: torch.Tensor,
                layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] in float32 for the given absolute positions (of `layer`, where layers differ)."""
    rotary = _rotary(model, layer)
    if rotary is None:
        raise KvpipeError(f"{type(model).__name__}: no rotary_emb module; only RoPE models are supported")
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32, device=positions.device)
    with torch.no_grad():
        cos, sin = rotary(probe, positions.view(1, -1))
    if cos.shape[-1] != head_dim:
        raise KvpipeError(f"{type(model).__name__}: partial rotary embeddings are not supported")
    return cos[0].float(), sin[0].float()


def layer_rope_tables(model: PreTrainedModel, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """rope_tables of every layer, each distinct table computed once."""
    if getattr(getattr(model, "model", model), "rotary_emb_local", None) is None:
        return [rope_tables(model, positions)] * model.config.num_hidden_layers
    types = model.config.layer_types
    tables = {kind: rope_tables(model, positions, types.index(kind)) for kind in set(types)}
    return [tables[kind] for kind in types]


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [..., T, head_dim] by the tables [T, head_dim]."""
    return keys * cos + rotate_half(keys) * sin


def invert_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo apply_rope exactly (up to floating-point rounding)."""
    return (keys * cos - rotate_half(keys) * sin) / (cos * cos + sin * sin)

"""Rotary position embedding: apply and exactly undo it, with the model's own frequencies.

RoPE rotates each pair of key dimensions (i, i + d/2) by angle position * inv_freq[i]:

    k_rot = k * cos + rotate_half(k) * sin,      rotate_half([a, b]) = [-b, a]

cos and sin come from the model's rotary module (so rope_scaling variants are honoured)
and may carry an attention scale s (cos = s cos θ, sin = s sin θ). Since rotate_half is
a rotation by 90° in each pair, the inverse is the rotation by -θ divided by s²:

    k = (k_rot * cos - rotate_half(k_rot) * sin) / (cos² + sin²)
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvpipe.errors import KvpipeError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(model: PreTrainedModel, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] in float32 for the given absolute positions."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
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


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [..., T, head_dim] by the tables [T, head_dim]."""
    return keys * cos + rotate_half(keys) * sin


def invert_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo apply_rope exactly (up to floating-point rounding)."""
    return (keys * cos - rotate_half(keys) * sin) / (cos * cos + sin * sin)

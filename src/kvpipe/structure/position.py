"""The RoPE basis of each token's position, read off the main model's stored keys.

RoPE rotates each pair of key dimensions (i, i + d/2) of every head by the angle
position × inv_freq[i]. With pre-RoPE (a, b) and post-RoPE (a', b') of one pair,

    a a' + b b' = (a² + b²) cos(position × inv_freq[i]),   a b' - b a' = (a² + b²) sin(...)

so [cos, sin] of every rotary frequency is recovered from the KV dataset itself (summed over
heads, which share the frequencies): exactly the rotation the main model applied, with its own θ
and any rope_scaling, and a function of the position alone. It is the position-only predictor's
input: if RoPE made the key space shared, these d features alone would explain most of the keys.
"""

from __future__ import annotations

import numpy as np


def rope_basis(key: np.ndarray, key_pre_rope: np.ndarray, head_dim: int) -> np.ndarray:
    """[rows, head_dim]: cos then sin of position × inv_freq for each of the head_dim / 2 frequencies."""
    half = head_dim // 2
    post = np.asarray(key, np.float64).reshape(len(key), -1, head_dim)
    pre = np.asarray(key_pre_rope, np.float64).reshape(len(key), -1, head_dim)
    a, b, a2, b2 = pre[..., :half], pre[..., half:], post[..., :half], post[..., half:]
    norm = (a * a + b * b).sum(1)
    safe = np.where(norm > 0, norm, 1.0)
    cos = np.where(norm > 0, (a * a2 + b * b2).sum(1) / safe, 1.0)
    sin = np.where(norm > 0, (a * b2 - b * a2).sum(1) / safe, 0.0)
    return np.concatenate([cos, sin], axis=1)

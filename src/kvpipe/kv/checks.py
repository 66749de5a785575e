"""Numerics checks shared by extraction and answering: every cache tensor and logit must be finite.

The notes' FP16-overflow trap: a non-finite value names the model, the tensor and the
compute dtype, and the run stops.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpipe.errors import KvpipeError
from kvpipe.models.load import LoadedModel


def check_finite(tensor: torch.Tensor, what: str, lm: LoadedModel) -> None:
    """Fail loudly on NaN/inf, naming the model, the tensor and the compute dtype."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise KvpipeError(f"model {lm.slug}: {bad} non-finite values in {what} with dtype "
                          f"{str(lm.dtype).removeprefix('torch.')}; use bfloat16 or float32 (extraction.dtype)")


def cache_layer(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [batch, kv_heads, T, head_dim] of one layer of a transformers cache."""
    entry = cache.layers[layer]
    return entry.keys, entry.values


def check_cache(cache: Any, lm: LoadedModel) -> None:
    """Every layer's keys and values must be finite; layers in order, so an overflow is named where it starts."""
    for layer in range(len(cache.layers)):
        keys, values = cache_layer(cache, layer)
        check_finite(keys, f"keys of layer {layer}", lm)
        check_finite(values, f"values of layer {layer}", lm)


def check_window(lm: LoadedModel, n_tokens: int, sample_id: str, extra: int = 0) -> None:
    """A prompt of n_tokens (plus `extra` tokens to decode) must fit the model's context window."""
    window = getattr(lm.model.config, "max_position_embeddings", None)
    if window is not None and n_tokens + extra > window:
        more = f" + {extra} tokens to decode" if extra else ""
        raise KvpipeError(f"sample {sample_id}: its prompt has {n_tokens} tokens{more} for model {lm.slug}, whose "
                          f"context window is {window}; lower sampling.max_context_tokens")

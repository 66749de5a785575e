"""From the scout's payload to a main-model context KV: projection, RoPE, key/value mixes, the mean cache, SVD.

The payload is what the scout sends: per scout layer, rows [n, p] (head-major) of its pre-RoPE
keys, post-RoPE keys and values, rounded to float16 as they would cross the network. Main layer
j is predicted from scout layer layer_map[j]; pre-RoPE keys are mapped and then rotated with the
RoPE of main layer j at each token's position (key_map "pre_rope"), or post-RoPE keys are mapped
directly (key_map "post_rope", a comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvpipe.inference.cache_sources import ContextKV
from kvpipe.models.load import LoadedModel
from kvpipe.models.rope import apply_rope, invert_rope, layer_rope_tables
from kvpipe.projection.payload import matrix_bytes
from kvpipe.projection.projectors import Projector

KEY_MAPS = ("pre_rope", "post_rope")


def rows(t: torch.Tensor) -> torch.Tensor:
    """[heads, n, d] -> [n, heads * d] (head-major)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n, heads * d] -> [heads, n, d]."""
    return t.reshape(t.shape[0], n_heads, -1).transpose(0, 1)


def _half(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


@dataclass(frozen=True)
class ScoutPayload:
    """The scout's KV rows per scout layer, float16-rounded: pre-RoPE keys, post-RoPE keys, values."""

    keys_pre: list[torch.Tensor]
    keys_post: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor

    @classmethod
    def from_context(cls, scout: LoadedModel, kv: ContextKV) -> ScoutPayload:
        """The payload of a scout's own context KV (post-RoPE keys are un-rotated with the scout's RoPE)."""
        tables = layer_rope_tables(scout.model, kv.positions)
        return cls([_half(rows(invert_rope(k.float(), *tables[layer]))) for layer, k in enumerate(kv.keys)],
                   [_half(rows(k.float())) for k in kv.keys], [_half(rows(v.float())) for v in kv.values],
                   kv.positions.cpu())

    def __len__(self) -> int:
        return len(self.positions)

    def truncated(self, kept: np.ndarray, rank: int | None) -> ScoutPayload:
        """Only the rows at cache indices `kept` (others zero); each kept matrix as rank-k float16 SVD factors
        when those are smaller than the matrix (payload.matrix_bytes), else as it is."""
        index = torch.as_tensor(np.asarray(kept), dtype=torch.long)

        def one(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(t)
            out[index] = _low_rank(t[index], rank)
            return out

        return ScoutPayload([one(t) for t in self.keys_pre], [one(t) for t in self.keys_post],
                            [one(t) for t in self.values], self.positions)


def _low_rank(x: torch.Tensor, rank: int | None) -> torch.Tensor:
    """x, or its rank-k truncated SVD rebuilt from float16 factors (U·S and Vᵀ) when those are smaller."""
    m, p = x.shape
    if rank is None or matrix_bytes(m, p, rank) >= matrix_bytes(m, p):
        return x
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return _half(u[:, :rank] * s[:rank]) @ _half(vh[:rank])


def project(projector: Projector, payload: ScoutPayload, layer_map: list[int], main: LoadedModel,
            key_map: str = "pre_rope") -> ContextKV:
    """The main model's context KV predicted from the scout's payload (differentiable in the projector)."""
    n_heads, device = main.card["num_kv_heads"], projector.device
    tables = layer_rope_tables(main.model, payload.positions.to(main.device))

    def mapped(j: int, kind: str, x: torch.Tensor) -> torch.Tensor:   # on the projector's device, then the main's
        return heads(projector(j, kind, x.to(device)).to(main.device), n_heads)

    keys, values = [], []
    for j, s in enumerate(layer_map):
        if key_map == "pre_rope":
            keys.append(apply_rope(mapped(j, "key", payload.keys_pre[s]), *tables[j]))
        else:
            keys.append(mapped(j, "key_post", payload.keys_post[s]))
        values.append(mapped(j, "value", payload.values[s]))
    return ContextKV(keys, values, payload.positions.to(main.device))


def mixed(keys_from: ContextKV, values_from: ContextKV) -> ContextKV:
    """The keys of one context KV with the values of another (same tokens and positions)."""
    return ContextKV(keys_from.keys, values_from.values, keys_from.positions)


def mean_context(means: dict[str, torch.Tensor], main: LoadedModel, positions: torch.Tensor) -> ContextKV:
    """The main's calibration-mean pre-RoPE key (rotated at each position) and value at every position.

    means: 'key' and 'value' -> [layers, num_kv_heads * head_dim].
    """
    n_heads, n = main.card["num_kv_heads"], len(positions)
    tables = layer_rope_tables(main.model, positions.to(main.device))
    keys = [apply_rope(heads(m.to(main.device).expand(n, -1), n_heads), *tables[j]) for j, m in enumerate(means["key"])]
    values = [heads(m.to(main.device).expand(n, -1), n_heads) for m in means["value"]]
    return ContextKV(keys, values, positions.to(main.device))

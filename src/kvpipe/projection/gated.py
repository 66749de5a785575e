"""The gated projector: per layer a linear map whose output is mixed per head with a fallback by a learned gate.

For main layer j, kind k and main KV head h (Cache-to-Cache's idea, written for this pipeline):

    ŷ_h = a_h + g_{j,h} (x W_j + b_j − a)_h

The fallback a is the main's calibration mean (the anchor) when the projected cache stands alone, and
the main's own rows when a cache is fused (the `fused` condition's fuser, kvpipe.projection.fuser,
a copy of a gated fit started at every gate 0): a gate of 1 passes the map through, a gate of 0
damps the head to its fallback. The reconstruction fit is the ridge map with every gate 1 (so it
equals `ridge`); the `distill` objective trains maps and gates together.
Gates are plain per-head scalars (unbounded, so the fit starts exactly at pass-through with a
non-zero gradient); their number is the main's KV heads, read from the KV dataset when fitting.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from kvpipe.linalg.ridge import pooled
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.projectors import Errors, LinearProjector, Stats
from kvpipe.settings import ProjectionSettings


class GatedProjector(LinearProjector):
    """Ridge maps plus a per-(layer, head) gate mixing each head with its fallback."""

    name: ClassVar[str] = "gated"

    def __init__(self, n_layers: int, kinds: tuple[str, ...], p: int, q: int, settings: ProjectionSettings) -> None:
        super().__init__(n_layers, kinds, p, q, settings)
        self.gate = nn.ParameterDict({k: nn.Parameter(torch.ones(n_layers, 1)) for k in kinds})
        self.register_buffer("anchor", torch.zeros(len(kinds), n_layers, q))
        self.gated = True

    def set_heads(self, n_heads: int) -> None:
        """One gate per main KV head (all 1: pass-through)."""
        for k in self.kinds:
            self.gate[k] = nn.Parameter(torch.ones(self.n_layers, n_heads, device=self.weight[k].device))

    def gates(self, layer: int, kind: str) -> torch.Tensor:
        """Per-channel gates [q] of a layer (each head's gate repeated over its dimensions)."""
        g = self.gate[kind][layer]
        return g.repeat_interleave(self.q // len(g))

    def mapped(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The ungated linear map x W + b."""
        return super().forward(layer, kind, x)

    def forward(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        y = self.mapped(layer, kind, x)
        if not self.gated:
            return y
        a = self.anchor[self.kinds.index(kind), layer]
        return a + self.gates(layer, kind) * (y - a)

    @contextmanager
    def ungated(self) -> Iterator[GatedProjector]:
        """Within the block, forward returns the ungated map (for fusing with the main's own rows)."""
        self.gated = False
        try:
            yield self
        finally:
            self.gated = True

    def fit(self, cal: Calibration, stats: Stats) -> Errors:
        errors = super().fit(cal, stats)  # ridge maps; gates at 1, so the anchor does not change the fit
        self.set_heads(int(cal.data.main_manifest["num_kv_heads"]))
        with torch.no_grad():
            for k, kind in enumerate(self.kinds):
                for j in range(self.n_layers):
                    s = pooled([stats[(j, kind, f)] for f in range(cal.folds)])
                    self.anchor[k, j] = torch.as_tensor(np.asarray(s.sy / s.n), dtype=torch.float32)
        return errors

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Size the gates as saved (one per head once fitted), then load."""
        for k in self.kinds:
            saved = state_dict.get(f"gate.{k}")
            if saved is not None and saved.shape != self.gate[k].shape:
                self.set_heads(saved.shape[1])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def fuse_heads(own: torch.Tensor, projected: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """own + g_h (projected − own) for tensors [heads, n, d] and gates [heads]."""
    g = gate.to(own.device, own.dtype)[:, None, None]
    return own + g * (projected.to(own.dtype) - own)

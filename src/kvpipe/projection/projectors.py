"""Projectors: learned maps from the scout's KV rows to the main's, one per (main layer, kind).

Every projector is a torch module, `forward(layer, kind, x)` mapping scout rows [n, p] to main
rows [n, q] (p, q = num_kv_heads * head_dim, head-major), fitted for the reconstruction objective
by `fit` and optionally refined for the attention objective (kvpipe.projection.attention).
Subclasses register in PROJECTORS under `name`:

    ridge    per-layer ridge with intercept, α by CV over calibration passages (closed form)
    shared   one linear map for every layer, per-layer intercepts (closed form)
    mlp      per layer: the ridge map (fitted on the training folds) plus a residual MLP trained on
             streamed shards with early stopping on the validation fold (seeded)

`fit` returns each kind's relative squared error Σ‖ŷ − y‖² / Σ‖y − ȳ‖² on calibration rows and on
held-out rows (the CV folds for closed forms, the validation fold for the MLP).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from kvpipe.io import atomic_path
from kvpipe.linalg.ridge import LinearMap, RidgeStats, pooled, squared_error
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.linear import choose_shared_alpha, fit_per_layer, fit_shared, ridge_cv_error, scatter
from kvpipe.registry import Registered
from kvpipe.settings import ProjectionSettings

PROJECTORS: dict[str, type[Projector]] = {}
Stats = dict[tuple[int, str, int], RidgeStats]
Errors = dict[str, dict[str, float]]   # kind -> {"calibration": e, "validation": e}


class Projector(Registered, nn.Module, ABC):
    """Maps scout KV rows to main KV rows per (main layer, kind)."""

    registry = PROJECTORS   # concrete kinds name themselves; shared bases do not

    def __init__(self, n_layers: int, kinds: tuple[str, ...], p: int, q: int, settings: ProjectionSettings) -> None:
        super().__init__()
        self.n_layers, self.kinds, self.p, self.q, self.settings = n_layers, kinds, p, q, settings

    @abstractmethod
    def forward(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Main rows [n, q] predicted from scout rows [n, p] (float32)."""

    @abstractmethod
    def fit(self, cal: Calibration, stats: Stats) -> Errors:
        """Fit for reconstruction; return each kind's calibration and held-out relative error."""

    @property
    def device(self) -> torch.device:
        """Where the projector's tensors live; `project` moves its inputs there."""
        return next(itertools.chain(self.parameters(), self.buffers())).device

    def n_params(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())

    def n_bytes(self) -> int:
        """Bytes of the saved tensors."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


def _folds(stats: Stats, j: int, kind: str, folds: int) -> list[RidgeStats]:
    return [stats[(j, kind, f)] for f in range(folds)]


def _errors(sse: dict[str, list[float]]) -> Errors:
    """{kind: {"calibration": Σsse/Σsst, "validation": ...}} from kind -> [cal sse, cal sst, val sse, val sst]."""
    return {kind: {"calibration": v[0] / v[1], "validation": v[2] / v[3]} for kind, v in sse.items()}


class LinearProjector(Projector):
    """Linear maps y = x W + b per layer and kind; subclasses choose how W is fitted."""

    shared: ClassVar[bool] = False

    def __init__(self, n_layers: int, kinds: tuple[str, ...], p: int, q: int, settings: ProjectionSettings) -> None:
        super().__init__(n_layers, kinds, p, q, settings)
        shape = (p, q) if self.shared else (n_layers, p, q)
        self.weight = nn.ParameterDict({k: nn.Parameter(torch.zeros(shape)) for k in kinds})
        self.bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(n_layers, q)) for k in kinds})

    def forward(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[kind] if self.shared else self.weight[kind][layer]
        return x @ w + self.bias[kind][layer]

    def set_maps(self, kind: str, maps: list[LinearMap]) -> None:
        """Load fitted maps (one per layer) into the parameters."""
        with torch.no_grad():
            w = torch.as_tensor(np.stack([m.W for m in maps]), dtype=torch.float32)
            self.weight[kind].copy_(w[0] if self.shared else w)
            self.bias[kind].copy_(torch.as_tensor(np.stack([m.b for m in maps]), dtype=torch.float32))

    def fit_kind(self, stats: Stats, kind: str, folds: int) -> list[LinearMap]:
        """The maps of one kind, one per layer."""
        grid = np.asarray(self.settings.alpha_grid, dtype=np.float64)
        return [fit_per_layer(_folds(stats, j, kind, folds), grid) for j in range(self.n_layers)]

    def fit(self, cal: Calibration, stats: Stats) -> Errors:
        sums = {}
        for kind in self.kinds:
            maps = self.fit_kind(stats, kind, cal.folds)
            self.set_maps(kind, maps)
            v = np.zeros(4)
            for j, m in enumerate(maps):
                folds = _folds(stats, j, kind, cal.folds)
                v += [squared_error(m, pooled(folds)), scatter(pooled(folds)), *ridge_cv_error(folds, m.alpha)]
            sums[kind] = list(v)
        return _errors(sums)


class RidgeProjector(LinearProjector):
    """Per-layer ridge, α by CV over calibration passages."""

    name: ClassVar[str] = "ridge"


class SharedProjector(LinearProjector):
    """One linear map for all layers with per-layer intercepts, α by CV over calibration passages."""

    name: ClassVar[str] = "shared"
    shared: ClassVar[bool] = True

    def fit_kind(self, stats: Stats, kind: str, folds: int) -> list[LinearMap]:
        grid = np.asarray(self.settings.alpha_grid, dtype=np.float64)
        by_fold = [[stats[(j, kind, f)] for j in range(self.n_layers)] for f in range(folds)]
        return fit_shared([pooled([by_fold[f][j] for f in range(folds)]) for j in range(self.n_layers)],
                          choose_shared_alpha(by_fold, grid))

    def fit(self, cal: Calibration, stats: Stats) -> Errors:
        sums = {}
        for kind in self.kinds:
            maps = self.fit_kind(stats, kind, cal.folds)
            self.set_maps(kind, maps)
            everything = [pooled(_folds(stats, j, kind, cal.folds)) for j in range(self.n_layers)]
            held = _shared_cv(stats, kind, cal.folds, self.n_layers, maps[0].alpha)
            sums[kind] = [sum(squared_error(m, s) for m, s in zip(maps, everything, strict=True)),
                          sum(scatter(s) for s in everything), *held]
        return _errors(sums)


def _shared_cv(stats: Stats, kind: str, folds: int, n_layers: int, alpha: float) -> tuple[float, float]:
    """Held-out (Σ SSE, Σ scatter) of the shared map at a fixed α over the CV folds."""
    sse = sst = 0.0
    for k in range(folds):
        rest = [pooled([stats[(j, kind, f)] for f in range(folds) if f != k]) for j in range(n_layers)]
        for j, m in enumerate(fit_shared(rest, alpha)):
            sse += squared_error(m, stats[(j, kind, k)])
            sst += scatter(stats[(j, kind, k)])
    return sse, sst


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors (on CPU, atomically; the folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))

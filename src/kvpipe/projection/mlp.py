"""The MLP projector: per (layer, kind) the ridge map plus a residual MLP, trained on streamed shards.

The ridge part is fitted in closed form on the training folds (α by CV over every calibration
fold); the residual MLP sees standardised inputs, starts at zero (so training starts from the
ridge map) and is trained with Adam one shard at a time, the validation fold's error checked
after every epoch: training stops after `patience` epochs without improvement and keeps the
best epoch's weights. Seeded; memory is one shard whatever the number of samples.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from kvpipe.linalg.ridge import choose_alpha, fit_ridge, pooled
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.projectors import Errors, Projector, Stats
from kvpipe.settings import ProjectionSettings


def _residual(p: int, hidden: int, q: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = p
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    last = nn.Linear(width, q)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class MLPProjector(Projector):
    """Ridge map plus a residual MLP per (layer, kind)."""

    name: ClassVar[str] = "mlp"

    def __init__(self, n_layers: int, kinds: tuple[str, ...], p: int, q: int, settings: ProjectionSettings) -> None:
        super().__init__(n_layers, kinds, p, q, settings)
        mlp = settings.mlp
        torch.manual_seed(settings.seed)
        keys = [self.key(j, k) for j in range(n_layers) for k in kinds]
        self.base = nn.ModuleDict({key: nn.Linear(p, q) for key in keys})
        self.residual = nn.ModuleDict({key: _residual(p, mlp.hidden, q, mlp.depth) for key in keys})
        self.register_buffer("x_mean", torch.zeros(len(kinds), n_layers, p))
        self.register_buffer("x_scale", torch.ones(len(kinds), n_layers, p))

    @staticmethod
    def key(layer: int, kind: str) -> str:
        return f"{kind}_{layer}"

    def forward(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        k = self.kinds.index(kind)
        z = (x - self.x_mean[k, layer]) / self.x_scale[k, layer]
        key = self.key(layer, kind)
        return self.base[key](x) + self.residual[key](z)

    def _init_base(self, cal: Calibration, stats: Stats) -> None:
        """Ridge on the training folds, α by CV over all calibration folds; input standardisation."""
        grid = np.asarray(self.settings.alpha_grid, dtype=np.float64)
        train = [f for f in range(cal.folds) if f != cal.validation_fold]
        with torch.no_grad():
            for k, kind in enumerate(self.kinds):
                for j in range(self.n_layers):
                    folds = [stats[(j, kind, f)] for f in range(cal.folds)]
                    rows = pooled([folds[f] for f in train])
                    m = fit_ridge(rows, choose_alpha(folds, grid))
                    base = self.base[self.key(j, kind)]
                    base.weight.copy_(torch.as_tensor(m.W.T, dtype=torch.float32))
                    base.bias.copy_(torch.as_tensor(m.b, dtype=torch.float32))
                    mean = rows.sx / rows.n
                    var = np.maximum(np.diag(rows.sxx) / rows.n - mean ** 2, 0)
                    self.x_mean[k, j] = torch.as_tensor(mean, dtype=torch.float32)
                    self.x_scale[k, j] = torch.as_tensor(np.sqrt(var) + 1e-6, dtype=torch.float32)

    def _epoch(self, cal: Calibration, optimiser: torch.optim.Optimizer, gen: torch.Generator) -> None:
        batch = self.settings.mlp.batch_tokens
        for _, block in cal.blocks("train", "mlp epoch"):
            for (j, kind), (X, Y) in block:
                if kind not in self.kinds:
                    continue
                x, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)
                order = torch.randperm(len(x), generator=gen)
                for start in range(0, len(x), batch):
                    rows = order[start:start + batch]
                    optimiser.zero_grad(set_to_none=True)
                    loss = torch.mean((self(j, kind, x[rows]) - y[rows]) ** 2)
                    loss.backward()
                    optimiser.step()

    def fit(self, cal: Calibration, stats: Stats) -> Errors:
        settings = self.settings.mlp
        self._init_base(cal, stats)
        gen = torch.Generator().manual_seed(self.settings.seed)
        optimiser = torch.optim.Adam(self.residual.parameters(), lr=settings.lr)
        best, best_state, waited = relative_errors(self, cal, "validation"), copy.deepcopy(self.state_dict()), 0
        for _ in range(settings.epochs):
            self._epoch(cal, optimiser, gen)
            err = relative_errors(self, cal, "validation")
            if sum(err.values()) < sum(best.values()):
                best, best_state, waited = err, copy.deepcopy(self.state_dict()), 0
            else:
                waited += 1
                if waited >= settings.patience:
                    break
        self.load_state_dict(best_state)
        train = relative_errors(self, cal, "train")
        return {kind: {"calibration": train[kind], "validation": best[kind]} for kind in self.kinds}


@torch.no_grad()
def relative_errors(projector: Projector, cal: Calibration, which: str) -> dict[str, float]:
    """Per kind Σ‖ŷ − y‖² / Σ‖y − ȳ‖² over the rows of `which` (ȳ per layer), streamed."""
    sse = dict.fromkeys(projector.kinds, 0.0)
    syy = dict.fromkeys(projector.kinds, 0.0)
    sy: dict[tuple[int, str], np.ndarray] = {}
    n: dict[tuple[int, str], int] = {}
    for _, block in cal.blocks(which, f"{projector.name} {which} error"):
        for (j, kind), (X, Y) in block:
            if kind not in projector.kinds:
                continue
            y_hat = projector(j, kind, torch.as_tensor(X, dtype=torch.float32)).double().numpy()
            sse[kind] += float(np.sum((y_hat - Y) ** 2))
            syy[kind] += float(np.sum(Y * Y))
            sy[(j, kind)] = sy.get((j, kind), 0) + Y.sum(0)
            n[(j, kind)] = n.get((j, kind), 0) + len(Y)
    centre = {kind: sum(float(v @ v) / n[key] for key, v in sy.items() if key[1] == kind) for kind in projector.kinds}
    return {kind: sse[kind] / (syy[kind] - centre[kind]) for kind in projector.kinds}

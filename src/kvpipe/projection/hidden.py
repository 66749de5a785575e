"""Hidden-state transfer: the scout's residual stream at one layer mapped into the main's, and partial prefills.

`HiddenMap` maps the scout's hidden states entering scout layer layer_map[L] to the main's entering
main layer L (HF's hidden_states[i] is the input of layer i; i = 0 is the embedding output). It is
fitted like the KV maps: ridge with intercept on the template and context tokens of calibration
prompts of the training folds (the validation fold gives the held-out error), α by CV over the
calibration folds. `main_from_layer` runs the main over the context from layer L only (its layers
below are skipped, not computed) and `main_bottom` runs only its bottom B layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache

from kvpipe.data.prompt import PromptTokens, build_prompt
from kvpipe.io import atomic_path, write_json
from kvpipe.kv.checks import cache_layer
from kvpipe.linalg.ridge import RidgeStats, choose_alpha, fit_ridge, pooled, squared_error
from kvpipe.models.load import LoadedModel
from kvpipe.projection.calibration import Calibration
from kvpipe.settings import ProjectionSettings


class HiddenMap(nn.Module):
    """h_main[L] ≈ h_scout[scout_layer] W + b (float32)."""

    def __init__(self, main_layer: int, scout_layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.main_layer, self.scout_layer = main_layer, scout_layer
        self.weight = nn.Parameter(weight.detach().clone().float())  # [scout hidden, main hidden]
        self.bias = nn.Parameter(bias.detach().clone().float())  # [main hidden]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.float().to(self.weight.device) @ self.weight + self.bias

    def n_bytes(self) -> int:
        return (self.weight.numel() + self.bias.numel()) * 4


@torch.no_grad()
def hidden_states(lm: LoadedModel, tokens: PromptTokens, layer: int) -> torch.Tensor:
    """The model's hidden states [context_end, hidden] entering `layer` over the prompt up to the context's end."""
    ids = torch.as_tensor(tokens.input_ids[: tokens.context_end], device=lm.device)[None]
    out = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return out.hidden_states[layer][0].float()


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _layers(lm: LoadedModel) -> torch.nn.ModuleList:
    return lm.model.model.layers


@contextmanager
def _hooked(lm: LoadedModel, hooks: list[tuple[int, Callable]]) -> Iterator[None]:
    handles = [_layers(lm)[j].register_forward_pre_hook(fn, with_kwargs=True) for j, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _skipped(lm: LoadedModel, below: int) -> Iterator[None]:
    """Layers below `below` pass their input through without computing (or caching) anything."""
    layers = _layers(lm)[:below]
    for layer in layers:
        tuple_out = "tuple" in str(inspect.signature(type(layer).forward).return_annotation)
        layer.forward = (lambda h, *a, **k: (h,)) if tuple_out else (lambda h, *a, **k: h)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _prefill(lm: LoadedModel, tokens: PromptTokens) -> DynamicCache:
    cache = DynamicCache()
    ids = torch.as_tensor(tokens.input_ids[: tokens.context_end], device=lm.device)[None]
    try:
        lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    except _Stop:
        pass
    return cache


def _stop(module: Any, args: tuple, kwargs: dict) -> None:
    raise _Stop


@torch.inference_mode()
def main_bottom(lm: LoadedModel, tokens: PromptTokens, bottom: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [kv_heads, n, d] of the main's own prefill through its bottom `bottom` layers only."""
    hooks = [(bottom, _stop)] if bottom < len(_layers(lm)) else []
    with _hooked(lm, hooks):
        cache = _prefill(lm, tokens)
    return [tuple(t[0] for t in cache_layer(cache, j)) for j in range(bottom)]


def layers_from(
    lm: LoadedModel, tokens: PromptTokens, layer: int, hidden: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of the main's layers layer.. when `hidden` [n, H] enters layer `layer` (layers below skipped;
    differentiable in `hidden`)."""

    def inject(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = hidden[None].to(lm.device, lm.dtype)
        return ((h, *args[1:]), kwargs) if args else ((), kwargs | {"hidden_states": h})

    with _skipped(lm, layer), _hooked(lm, [(layer, inject)]):
        cache = _prefill(lm, tokens)
    return [tuple(t[0] for t in cache_layer(cache, j)) for j in range(layer, len(_layers(lm)))]


@torch.inference_mode()
def main_from_layer(
    lm: LoadedModel, tokens: PromptTokens, layer: int, hidden: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """layers_from without gradients."""
    return layers_from(lm, tokens, layer, hidden)


def fit_hidden_map(
    cal: Calibration,
    samples: pd.DataFrame,
    scout: LoadedModel,
    main: LoadedModel,
    prompt: dict[str, Any],
    cfg: ProjectionSettings,
) -> tuple[HiddenMap, dict[str, float]]:
    """Ridge from the scout's to the main's hidden states on calibration prompts; held-out error on the validation fold."""
    layer = min(round(cfg.hybrid.hidden_depth * len(cal.layer_map)), len(cal.layer_map) - 1)
    scout_layer = cal.layer_map[layer]
    rng = np.random.default_rng([cfg.seed, 7])
    idx = samples["sample_idx"].to_numpy()
    chosen = np.sort(rng.permutation(idx[cal.part(idx, "calibration")])[: cfg.hybrid.hidden_samples])
    by_idx = samples.set_index("sample_idx", drop=False)
    folds: dict[int, RidgeStats] = {}
    for i in chosen:
        row = by_idx.loc[i]
        tokens = build_prompt(main.tokenizer, prompt, row["context"], row["question"])
        x, y = hidden_states(scout, tokens, scout_layer), hidden_states(main, tokens, layer)
        f = int(cal.fold_of[i])
        folds.setdefault(f, RidgeStats(x.shape[1], y.shape[1])).add(x.double().cpu().numpy(), y.double().cpu().numpy())
    parts = [folds[f] for f in sorted(folds)]
    alpha = choose_alpha(parts, np.asarray(cfg.alpha_grid, dtype=np.float64)) if len(parts) > 1 else cfg.alpha_grid[0]
    m = fit_ridge(pooled(parts), alpha)
    train = [folds[f] for f in folds if f != cal.validation_fold]
    errors = {"calibration": _rel(m, pooled(parts))}
    if cal.validation_fold in folds and train:
        errors["validation"] = _rel(fit_ridge(pooled(train), alpha), folds[cal.validation_fold])
    return HiddenMap(
        layer, scout_layer, torch.as_tensor(m.W, dtype=torch.float32), torch.as_tensor(m.b, dtype=torch.float32)
    ), errors


def _rel(m: Any, s: RidgeStats) -> float:
    return float(squared_error(m, s) / max(float(s.syy - s.sy @ s.sy / s.n), 1e-12))


def save_hidden_map(m: HiddenMap, errors: dict[str, Any], about: dict[str, Any], out_dir: Path, objective: str) -> None:
    """projectors/hidden-{objective}.safetensors and .json."""
    base = Path(out_dir) / f"hidden-{objective}"
    with atomic_path(base.with_suffix(".safetensors")) as tmp:
        save_file({"weight": m.weight.detach().cpu().contiguous(), "bias": m.bias.detach().cpu().contiguous()}, str(tmp))
    write_json(
        base.with_suffix(".json"),
        about
        | {
            "projector": "hidden",
            "objective": objective,
            "main_layer": m.main_layer,
            "scout_layer": m.scout_layer,
            "errors": errors,
            "bytes": m.n_bytes(),
        },
    )

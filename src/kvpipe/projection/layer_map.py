"""Which scout layer feeds each main layer's projected KV.

Every main layer needs a cache, so a layer map gives, for each main layer j, a scout layer:

    relative_depth   round(j (Ls - 1) / (Lm - 1))            (the structure stage's alignment)
    last_aligned     the last layers aligned, j - (Lm - Ls), clipped to [0, Ls - 1] (Cache-to-Cache's)
    best_cka         the scout layer with the highest debiased CKA to main layer j, averaged over
                     pre-RoPE keys and values, from the structure stage's metrics table
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from kvpipe.errors import KvpipeError


def relative_depth(n_scout: int, n_main: int, cka: pd.DataFrame | None = None) -> list[int]:
    """Main layer j <- scout layer at the same relative depth."""
    if n_main == 1:
        return [n_scout - 1]
    return [int(round(j * (n_scout - 1) / (n_main - 1))) for j in range(n_main)]


def last_aligned(n_scout: int, n_main: int, cka: pd.DataFrame | None = None) -> list[int]:
    """Main layer j <- scout layer j - (Lm - Ls): last layers together, shallow main layers from scout layer 0."""
    return [int(np.clip(j - (n_main - n_scout), 0, n_scout - 1)) for j in range(n_main)]


def best_cka(n_scout: int, n_main: int, cka: pd.DataFrame | None = None) -> list[int]:
    """Main layer j <- the scout layer of highest debiased CKA (mean of pre-RoPE keys and values)."""
    if cka is None:
        raise KvpipeError("projection.layer_map: best_cka needs the structure stage's metrics table")
    sel = cka[(cka["metric"] == "cka_debiased") & cka["kind"].isin(["key_pre_rope", "value"])]
    grid = sel.groupby(["main_layer", "scout_layer"])["value"].mean().unstack("scout_layer")
    missing = sorted(set(range(n_main)) - set(grid.index))
    if missing:
        raise KvpipeError(f"projection.layer_map: best_cka has no CKA for main layer {missing[0]} (extraction.layers)")
    return [int(grid.loc[j].idxmax()) for j in range(n_main)]


LAYER_MAPS: dict[str, Callable[[int, int, pd.DataFrame | None], list[int]]] = {
    "relative_depth": relative_depth, "last_aligned": last_aligned, "best_cka": best_cka}


def layer_map(name: str, n_scout: int, n_main: int, structure_metrics: Path | None = None) -> list[int]:
    """The scout layer of each main layer under the named map."""
    if name not in LAYER_MAPS:
        raise KvpipeError(f"projection.layer_map: unknown map {name!r}; known: {', '.join(LAYER_MAPS)}")
    cka = pd.read_parquet(structure_metrics) if structure_metrics is not None else None
    return LAYER_MAPS[name](n_scout, n_main, cka)

"""The hidden-state map for projected_hidden: fitted (ridge), optionally trained with `distill`, saved.

With `hybrid.hidden_objective: distill` the ridge map is refined like a KV projector
(kvpipe.projection.distill_fit): the student cache is projected_hidden's (projected KV below layer
L from the `hybrid` projector, which stays fixed, and the main's own KV of layers L.. computed from
the mapped scout hidden states), the loss the KL of the main's next-token distributions against
its own cache's; only the map's weight and bias are trained. Question samples of calibration
passages only, as for the KV projectors.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from kvpipe.inference.cache_sources import ContextKV
from kvpipe.models.load import LoadedModel
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.distill import DistillSample, kl_after, kv_f1
from kvpipe.projection.distill_fit import FitSchedule, fit_distill
from kvpipe.projection.distill_stage import DistillData, distill_data, finished, sample_counts
from kvpipe.projection.hidden import HiddenMap, fit_hidden_map, hidden_states, layers_from, save_hidden_map
from kvpipe.projection.inject import project
from kvpipe.projection.projectors import Projector
from kvpipe.settings import ProjectionSettings


class HiddenStudent(nn.Module):
    """The trained hidden map beside the fixed KV projector of the layers below it (not a submodule: not trained)."""

    def __init__(self, hidden: HiddenMap, projector: Projector) -> None:
        super().__init__()
        self.hidden, self._fixed = hidden, (projector,)

    @property
    def projector(self) -> Projector:
        return self._fixed[0]


def hybrid_context(student: HiddenStudent, sample: DistillSample, layer_map: list[int], main: LoadedModel) -> ContextKV:
    """projected_hidden's context KV of a sample's prefix (differentiable in the hidden map)."""
    layer = student.hidden.main_layer
    with torch.no_grad():
        below = project(student.projector, sample.payload, layer_map, main)
    upper = layers_from(main, sample.tokens, layer, student.hidden(sample.hidden))
    keys = [k.float() for k in below.keys[:layer]] + [k.float() for k, _ in upper]
    values = [v.float() for v in below.values[:layer]] + [v.float() for _, v in upper]
    return ContextKV(keys, values, below.positions)


def hidden_loss(student: HiddenStudent, sample: DistillSample, layer_map: list[int], main: LoadedModel) -> torch.Tensor:
    """KL(p_own ‖ p_projected_hidden) over the tokens after the context."""
    return kl_after(hybrid_context(student, sample, layer_map, main), sample, main)


def hidden_f1(
    student: HiddenStudent, sample: DistillSample, layer_map: list[int], main: LoadedModel, max_new_tokens: int
) -> float:
    """F1 of the main's greedy answer from projected_hidden's cache."""
    with torch.no_grad():
        return kv_f1(hybrid_context(student, sample, layer_map, main), sample, main, max_new_tokens)


def with_hidden(samples: list[DistillSample], scout: LoadedModel, scout_layer: int) -> list[DistillSample]:
    """The question samples, each with the scout's hidden states of its context entering `scout_layer`."""
    return [dataclasses.replace(s, hidden=hidden_states(scout, s.tokens, scout_layer)) for s in samples if s.tokens is not None]


def distill_hidden(
    hidden: HiddenMap,
    projector: Projector,
    data: DistillData,
    layer_map: list[int],
    main: LoadedModel,
    cfg: ProjectionSettings,
    checkpoint: Path | None = None,
) -> tuple[HiddenMap, dict[str, Any]]:
    """A copy of the hidden map trained with distill (on the main's device, returned on CPU) and its card fields."""
    student = HiddenStudent(copy.deepcopy(hidden).to(main.device), projector.to(main.device))
    result = fit_distill(student, *data, layer_map, main, FitSchedule.of(cfg), checkpoint, loss=hidden_loss, f1=hidden_f1)
    finished(checkpoint)
    fields = {k: result[k] for k in ("calibration", "validation", "steps", "learning_curve", "tokens_seen")}
    return student.hidden.cpu(), fields | sample_counts(data)


def stage_hidden_map(
    cal: Calibration,
    table: pd.DataFrame,
    models: tuple[LoadedModel, LoadedModel],
    prompt: dict[str, Any],
    cfg: ProjectionSettings,
    projectors: dict[tuple[str, str], Projector],
    about: dict[str, Any],
    out_dir: Path,
) -> HiddenMap:
    """Fit (and with hidden_objective distill, train) the hidden map and save it under out_dir/projectors."""
    scout, main = models
    hidden, errors = fit_hidden_map(cal, table, scout, main, prompt, cfg)
    objective = cfg.hybrid.hidden_objective
    if objective == "distill":
        train, held = distill_data(cal, table, scout, main, prompt, cfg)
        data = (with_hidden(train, scout, hidden.scout_layer), with_hidden(held, scout, hidden.scout_layer))
        projector = projectors[(cfg.hybrid.projector, cfg.hybrid.objective)]
        hidden, fields = distill_hidden(hidden, projector, data, cal.layer_map, main, cfg, out_dir / "checkpoints" / "hidden.pt")
        errors = {"reconstruction": errors, "distill": fields}
    save_hidden_map(hidden, errors, about, out_dir / "projectors", objective)
    return hidden

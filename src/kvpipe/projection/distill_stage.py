"""The distill objective in the projection stage: its calibration samples and one fit per projector.

Samples come from calibration passages only: seeded question prompts of the training folds for
training and of the validation fold for early stopping (and, with `continuation`, each chosen
passage's continuation too), plus, for training, the samples of the configured extra unlabeled
passages (kvpipe.projection.extra). No test passage is read. Each projector's distill fit refines a copy
of its reconstruction fit on the main model's device (CUDA when `device` says so).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvpipe.data.prompt import build_prompt
from kvpipe.models.load import LoadedModel
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.distill import DistillSample, continuation_sample, question_sample
from kvpipe.projection.distill_fit import FitSchedule, fit_distill
from kvpipe.projection.extra import extra_samples
from kvpipe.projection.projectors import Projector
from kvpipe.settings import ProjectionSettings

DistillData = tuple[list[DistillSample], list[DistillSample]]


def settings_of(cfg: ProjectionSettings) -> dict[str, Any]:
    """What a distilled projector's card records of its settings: the `distill` section, the stage's seed and answer length."""
    return asdict(cfg.distill) | {"seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens}


def _samples(
    rows: pd.DataFrame, scout: LoadedModel, main: LoadedModel, prompt: dict[str, Any], cfg: ProjectionSettings
) -> list[DistillSample]:
    out, seen = [], set()
    for row in rows.itertuples(index=False):
        tokens = build_prompt(main.tokenizer, prompt, row.context, row.question)
        answers = () if row.is_impossible else tuple(row.answers)
        out.append(question_sample(scout, main, tokens, answers, cfg.max_new_tokens, cfg.distill.teacher_top_k))
        if cfg.distill.continuation and row.passage not in seen:
            seen.add(row.passage)
            out.append(continuation_sample(scout, main, tokens, cfg.distill.teacher_top_k))
    return out


def calibration_rows(cal: Calibration, samples: pd.DataFrame, cfg: ProjectionSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded training and held-out rows of the samples table from the training and validation calibration folds."""
    rng = np.random.default_rng([cfg.seed, 22])
    idx = samples["sample_idx"].to_numpy()
    train = np.sort(rng.permutation(idx[cal.part(idx, "train")])[: cfg.distill.samples])
    held = np.sort(rng.permutation(idx[cal.part(idx, "validation")])[: cfg.distill.held_out])
    by_idx = samples.set_index("sample_idx", drop=False)
    return by_idx.loc[train], by_idx.loc[held]


def distill_data(
    cal: Calibration,
    samples: pd.DataFrame,
    scout: LoadedModel,
    main: LoadedModel,
    prompt: dict[str, Any],
    cfg: ProjectionSettings,
) -> DistillData:
    """Seeded training and held-out samples from the training and validation calibration folds; the extra
    passages' samples (distill.extra, none overlapping a passage of the samples table) train too."""
    train, held = calibration_rows(cal, samples, cfg)
    extra = extra_samples(scout, main, prompt, cfg, list(samples["context"].unique()))
    return (_samples(train, scout, main, prompt, cfg) + extra, _samples(held, scout, main, prompt, cfg))


def sample_counts(data: DistillData) -> dict[str, int]:
    """Training samples (those of extra passages among them) and held-out samples, for a card."""
    train, held = data
    return {"train_samples": len(train), "extra_samples": sum(s.extra for s in train), "held_out_samples": len(held)}


def finished(checkpoint: Path | None) -> None:
    """A fit is done: remove its checkpoint (a rerun starts afresh) and the folder once empty."""
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
        if checkpoint.parent.exists() and not any(checkpoint.parent.iterdir()):
            checkpoint.parent.rmdir()


def distilled(
    projector: Projector,
    data: DistillData,
    layer_map: list[int],
    main: LoadedModel,
    cfg: ProjectionSettings,
    checkpoint: Path | None,
) -> tuple[Projector, dict[str, Any], dict[str, Any], float]:
    """A distilled copy of a fitted projector (on CPU), its errors, its card fields and its peak memory (MiB)."""
    refined = copy.deepcopy(projector).to(main.device)
    result = fit_distill(refined, *data, layer_map, main, FitSchedule.of(cfg), checkpoint)
    finished(checkpoint)
    card = {
        "distill": {k: result[k] for k in ("steps", "learning_curve", "tokens_seen")}
        | sample_counts(data)
        | {"settings": settings_of(cfg)}
    }
    errors = {"distill": {"calibration": result["calibration"], "validation": result["validation"]}}
    return refined.cpu(), errors, card, result["peak_mib"]

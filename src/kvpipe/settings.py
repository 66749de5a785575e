"""Typed settings: one frozen dataclass per config section a stage reads, built once from the validated section.

`from_section(Settings, section)` is the one place a section becomes its dataclass: each field from the key of
the same name, a nested dataclass from its sub-mapping, an optional field (default None) left at its default
when the key is absent. The schema (workflow/schemas/config.schema.yaml) has validated the section and filled
its defaults; tests check every dataclass has exactly the schema's keys.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kvpipe.config import deep_merge, section_defaults

T = TypeVar("T")


def from_section(cls: type[T], section: Mapping[str, Any]) -> T:
    """The settings dataclass cls built from a validated config section."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in section and f.default is None:
            continue
        kind = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)), None)
        values[f.name] = from_section(kind, section[f.name]) if kind is not None else section[f.name]
    return cls(**values)


def recorded(cls: type[T], section: str, values: Mapping[str, Any]) -> T:
    """The settings dataclass cls of config section `section` as a record (a stage's facts.json) wrote it; keys the
    record lacks (written before they existed) take the schema's defaults."""
    return from_section(cls, deep_merge(section_defaults(section), dict(values)))


@dataclass(frozen=True)
class CcaSettings:
    """structure.cca: the regularised CCA of each aligned layer pair."""

    components: int
    regularisation: float
    top: int


@dataclass(frozen=True)
class StructurePool:
    """The one alignment setting the structure stage reads (a pair whose tokenizers differ)."""

    pool: str


@dataclass(frozen=True)
class StructureSettings:
    """The `structure` section, and `alignment` (pool) for a pair whose tokenizers differ."""

    calibration_fraction: float
    cv_folds: int
    alpha_grid: list[float]
    segments: list[str]
    cka_tokens: int
    bootstrap: int
    ci: float
    seed: int
    cca: CcaSettings
    thresholds: dict[str, float]
    alignment: StructurePool | None = None


@dataclass(frozen=True)
class SelectionCover:
    """The one alignment setting the selection stage reads (a pair whose tokenizers differ)."""

    min_cover: float


@dataclass(frozen=True)
class SelectionSettings:
    """The `selection` section, and `alignment` (min_cover) for a pair whose tokenizers differ."""

    retention: list[float]
    methods: list[str]
    snapkv: dict[str, Any]   # the SnapKV preset and overrides (kvpipe.scoring.methods.SnapKV.from_config)
    budget: str
    max_new_tokens: int
    rerotate: bool
    per_head: bool
    max_samples: int | None
    bootstrap: int
    ci: float
    seed: int
    alignment: SelectionCover | None = None


@dataclass(frozen=True)
class MlpSettings:
    """projection.mlp: the residual MLP projector's size and training."""

    hidden: int
    depth: int
    epochs: int
    lr: float
    patience: int
    batch_tokens: int


@dataclass(frozen=True)
class AttentionSettings:
    """projection.attention: the attention-output refinement of a fitted projector."""

    samples: int
    held_out: int
    steps: int
    lr: float
    eval_every: int


@dataclass(frozen=True)
class ExtraPassages:
    """projection.distill.extra: passages beyond the sample table to distill on."""

    source: str
    path: str | None
    passages: int
    seed: int
    target: str
    question_tokens: int


@dataclass(frozen=True)
class DistillSettings:
    """projection.distill: the answer-distillation refinement of a fitted projector."""

    samples: int
    held_out: int
    continuation: bool
    teacher_top_k: int | None
    steps: int
    accumulate: int
    lr: float
    eval_every: int
    patience: int
    checkpoint_every: int
    extra: ExtraPassages


@dataclass(frozen=True)
class HybridSettings:
    """projection.hybrid: the main's own bottom layers under projected top layers, and the hidden-state map."""

    projector: str
    objective: str
    bottom_fractions: list[float]
    hidden_depth: float
    hidden_samples: int
    hidden_objective: str


@dataclass(frozen=True)
class FusedSettings:
    """projection.fused: the fuser's starting gated projector."""

    objective: str


@dataclass(frozen=True)
class ChainSettings:
    """projection.chain: scout selection, then projection, then a low-rank payload."""

    method: str
    projector: str
    objective: str
    retention: list[float]
    rank: list[int | str]


@dataclass(frozen=True)
class TtftSettings:
    """projection.ttft: the link speeds and the target of the time-to-first-token report."""

    link_mbps: list[float]
    target: float


@dataclass(frozen=True)
class ProjectionSettings:
    """The `projection` section."""

    calibration_fraction: float
    cv_folds: int
    alpha_grid: list[float]
    layer_map: str
    projectors: list[str]
    objectives: list[str]
    post_rope_comparison: bool
    mlp: MlpSettings
    attention: AttentionSettings
    distill: DistillSettings
    hybrid: HybridSettings
    fused: FusedSettings
    conditions: list[str]
    retention: list[float]
    budget: str
    chain: ChainSettings
    max_new_tokens: int
    batch_size: int
    max_test_samples: int | None
    ttft_samples: int | None
    ttft: TtftSettings
    bootstrap: int
    ci: float
    seed: int

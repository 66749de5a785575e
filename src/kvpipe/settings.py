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

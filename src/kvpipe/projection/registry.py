"""The projection stage's registries, complete whoever imports them first.

Projectors and conditions register themselves by name when their class is defined (kvpipe.registry):
ridge and shared in kvpipe.projection.projectors, mlp and gated in their own modules; the conditions in
kvpipe.projection.conditions and the hybrid caches in kvpipe.projection.hybrid. This module imports every
module that defines one, so its PROJECTORS and CONDITIONS hold them all; use them from here.
"""

from __future__ import annotations

from kvpipe.projection import gated, hybrid, mlp  # noqa: F401  (the modules that define registry members)
from kvpipe.projection.conditions import CONDITIONS, Plan, SampleInputs
from kvpipe.projection.projectors import PROJECTORS

__all__ = ["CONDITIONS", "PROJECTORS", "plan_all"]


def plan_all(s: SampleInputs, names: list[str]) -> list[Plan]:
    """Every row of the named conditions, in the order named."""
    return [plan for name in names for plan in CONDITIONS[name]().plans(s)]

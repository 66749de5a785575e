"""Hashes of the kvpipe code a stage runs, so a code change reruns exactly the stages it touches."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import cache
from pathlib import Path

# The kvpipe modules each workflow stage executes.
STAGE_MODULES = {
    "materialize": ("kvpipe.models", "kvpipe.tiny", "kvpipe.io"),
    "sample": ("kvpipe.sampling", "kvpipe.squad", "kvpipe.synthetic", "kvpipe.prompt", "kvpipe.loading", "kvpipe.io"),
    "extract": ("kvpipe.extract", "kvpipe.kvstore", "kvpipe.prompt", "kvpipe.rope", "kvpipe.loading", "kvpipe.io"),
    "structure": ("kvpipe.structure", "kvpipe.structure_stage", "kvpipe.structure_report", "kvpipe.kvstore", "kvpipe.stats",
                  "kvpipe.io"),
    "selection": ("kvpipe.selection", "kvpipe.selection_stage", "kvpipe.selection_report", "kvpipe.answering",
                  "kvpipe.metrics", "kvpipe.prompt", "kvpipe.rope", "kvpipe.loading", "kvpipe.extract", "kvpipe.stats",
                  "kvpipe.io"),
}


@cache
def code_hash(stage: str) -> str:
    """SHA-256 (first 16 hex digits) over the source of the modules a stage runs."""
    digest = hashlib.sha256()
    for name in sorted(STAGE_MODULES[stage]):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"no module named {name}")
        digest.update(f"{name}\n".encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]

"""Hashes of the kvpipe code a stage runs, so a code change reruns exactly the stages it touches."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import cache
from pathlib import Path

# The kvpipe modules each workflow stage executes.
STAGE_MODULES = {
    "materialize": ("kvpipe.models", "kvpipe.models.tiny", "kvpipe.io"),
    "sample": ("kvpipe.data.sampling", "kvpipe.data.squad", "kvpipe.data.synthetic", "kvpipe.data.prompt", "kvpipe.models.load", "kvpipe.io"),
    "extract": ("kvpipe.kv.extract", "kvpipe.kv.store", "kvpipe.data.prompt", "kvpipe.models.rope", "kvpipe.models.load", "kvpipe.io"),
    "structure": ("kvpipe.structure", "kvpipe.structure.stage", "kvpipe.structure.report", "kvpipe.kv.store", "kvpipe.stats",
                  "kvpipe.io"),
    "selection": ("kvpipe.selection", "kvpipe.selection.stage", "kvpipe.selection.report", "kvpipe.inference.session",
                  "kvpipe.data.qa_metrics", "kvpipe.data.prompt", "kvpipe.models.rope", "kvpipe.models.load", "kvpipe.kv.extract", "kvpipe.stats",
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

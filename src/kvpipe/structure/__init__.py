"""Structural analysis: CKA, the stage runner (ridge and CCA from kvpipe.linalg) and its report."""

from kvpipe.stages import MAIN_KV, SAMPLES, SCOUT_KV, Stage

STAGE = Stage(
    name="structure",
    help="Analyse how a scout's keys and values predict a main model's (two KV datasets).",
    order=10,
    inputs=(SCOUT_KV, MAIN_KV, SAMPLES),
    tables=("metrics.parquet", "facts.json"),
    alignment=("pool",),
)

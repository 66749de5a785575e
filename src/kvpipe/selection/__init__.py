"""Selection transfer: scout/main overlap, the stage runner (methods from kvpipe.scoring) and its report."""

from kvpipe.stages import MAIN_DIR, SAMPLES, SCOUT_DIR, Stage

STAGE = Stage(
    name="selection",
    help="Token selection by scout and main, overlap, and QA F1 from pruned caches.",
    order=20,
    inputs=(SCOUT_DIR, MAIN_DIR, SAMPLES),
    tables=("answers.parquet", "overlap.parquet", "facts.json"),
    timing=("timings.parquet",),
    alignment=("min_cover",),
    models=True,
    verdicts=True,
    job_rules=("selection_chunk",),  # answering runs per chunk of samples (workflow/rules/chunks.smk)
)

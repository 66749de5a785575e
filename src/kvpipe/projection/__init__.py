"""The projection stage: scout->main KV projectors, injection into the main model, bytes and time to first token."""

from kvpipe.stages import MAIN_DIR, MAIN_KV, SAMPLES, SCOUT_DIR, SCOUT_KV, Input, Stage

STAGE = Stage(
    name="projection",
    help="Fit scout->main KV projectors, inject them, answer; bytes and TTFT.",
    order=30,
    inputs=(
        SCOUT_KV,
        MAIN_KV,
        SCOUT_DIR,
        MAIN_DIR,
        SAMPLES,
        Input(
            "structure_metrics",
            "the structure stage's metrics.parquet (needed by projection.layer_map: best_cka)",
            required=False,
        ),
    ),
    tables=("answers.parquet", "projector_metrics.parquet", "facts.json"),
    timing=("ttft.parquet", "timings.parquet", "timings.json"),
    models=True,
    verdicts=True,
    job_rules=("projection_fit", "projection_chunk"),  # answering runs per chunk of samples (workflow/rules/chunks.smk)
)

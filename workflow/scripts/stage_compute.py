"""Compute rule of a stage ({stage}): its inputs and settings -> its tables, as `kvpipe {stage}` computes them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.stages import stage
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    job = stage(snakemake.params.stage)
    job.compute(job.job_inputs(snakemake.input), snakemake.wildcards.pair, snakemake.params.settings,
                Path(snakemake.output[0]).parent)

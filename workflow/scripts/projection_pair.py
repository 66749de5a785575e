"""Rule projection: a pair's KV datasets and models x samples -> projectors, answers, metrics, facts, timing files."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.projection.stage import run_projection
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    run_projection(Path(snakemake.input.scout_kv).parent, Path(snakemake.input.main_kv).parent, snakemake.input.samples,
                   Path(snakemake.input.scout).parent, Path(snakemake.input.main).parent, snakemake.wildcards.pair,
                   snakemake.params.projection, snakemake.params.prompt, snakemake.params.device,
                   snakemake.params.dtype, Path(snakemake.output.answers).parent, snakemake.input.structure or None)

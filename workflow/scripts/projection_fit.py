"""Rule projection_fit: a pair's KV datasets and models x samples -> projectors, their metrics, facts, answering state."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.projection.stage import fit_projection
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    s = snakemake.params.settings
    fit_projection(Path(snakemake.input.scout_kv).parent, Path(snakemake.input.main_kv).parent, snakemake.input.samples,
                   Path(snakemake.input.scout).parent, Path(snakemake.input.main).parent, snakemake.wildcards.pair,
                   s["projection"], s["prompt"], s["device"], s["dtype"], Path(snakemake.output.metrics).parent,
                   snakemake.input.structure or None)

"""Rule structure: two KV datasets -> tidy metrics table and facts."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.structure.stage import run_structure
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    run_structure(Path(snakemake.input.scout).parent, Path(snakemake.input.main).parent, snakemake.input.samples,
                  snakemake.wildcards.pair, snakemake.params.structure, Path(snakemake.output.metrics).parent)

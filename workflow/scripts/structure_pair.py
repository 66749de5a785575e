"""Rule structure: two KV datasets -> metrics table, figures, summary."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.structure.stage import run_structure
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    run_structure(Path(snakemake.input.scout).parent, Path(snakemake.input.main).parent, snakemake.wildcards.pair,
                  snakemake.wildcards.dataset, snakemake.params.structure, Path(snakemake.output.metrics).parent)

"""Rule selection: a pair's models x samples -> answers, overlaps, timings and facts."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.selection.stage import run_selection
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    run_selection(Path(snakemake.input.scout).parent, Path(snakemake.input.main).parent, snakemake.input.samples,
                  snakemake.wildcards.pair, snakemake.params.selection, snakemake.params.prompt,
                  snakemake.params.device, snakemake.params.dtype, Path(snakemake.output.answers).parent)

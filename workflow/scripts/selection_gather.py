"""Rule selection: a pair's selection chunks -> its answers, overlaps, timings and facts."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.selection.gather import gather
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    gather([Path(a).parent for a in snakemake.input.chunks], snakemake.input.samples,
           {"scout": Path(snakemake.input.scout).parent, "main": Path(snakemake.input.main).parent},
           snakemake.wildcards.pair, snakemake.params.settings["selection"], Path(snakemake.output.answers).parent)

"""Rule selection_chunk: a pair's models x one chunk of samples -> answers, overlaps and timings."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.selection.stage import run_chunk
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    s = snakemake.params.settings
    run_chunk(Path(snakemake.input.scout).parent, Path(snakemake.input.main).parent, snakemake.input.chunk,
              snakemake.wildcards.pair, s["selection"], s["prompt"], s["device"], s["dtype"],
              Path(snakemake.output.answers).parent, snakemake.input.samples or None)

"""Rule projection_chunk: a pair's models and fitted projectors x one chunk of samples -> answers, TTFT, timings."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.projection.stage import answer_chunk
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    s = snakemake.params.settings
    answer_chunk(snakemake.input.answering, snakemake.input.chunk, Path(snakemake.input.scout).parent,
                 Path(snakemake.input.main).parent, snakemake.wildcards.pair, s["projection"], s["prompt"],
                 s["device"], s["dtype"], Path(snakemake.output.answers).parent)

"""Rule projection: a pair's answering chunks and fit timings -> its answers and timing files."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.projection.gather import gather
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    gather([Path(a).parent for a in snakemake.input.chunks], snakemake.input.fit_timings,
           Path(snakemake.output.answers).parent)

"""Rule extract_kv: a model's KV chunks -> its KV dataset (shards linked, one manifest)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.chunks import gather_kv
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    gather_kv([Path(m).parent for m in snakemake.input.chunks], snakemake.input.samples,
              Path(snakemake.output.manifest).parent)

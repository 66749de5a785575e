"""Rule extract_kv_chunk: model x one chunk of samples -> sharded Parquet KV dataset."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.kv.extract import extract
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    extract(Path(snakemake.input.model).parent, snakemake.input.samples, Path(snakemake.output.manifest).parent,
            snakemake.params.extraction, snakemake.params.prompt, snakemake.params.device, snakemake.wildcards.dataset)

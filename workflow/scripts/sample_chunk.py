"""Rule sample_chunk: dataset -> one chunk of the seeded sample table (Parquet)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.data.sampling import sample_to_file
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    first, end = snakemake.params.samples
    sample_to_file(snakemake.wildcards.dataset, snakemake.params.dataset, snakemake.params.tokenizer,
                   snakemake.params.prompt, snakemake.params.sampling | {"n": end}, snakemake.output.samples, first)

"""Rule sample_dataset: the chunks of a dataset's sample -> its sample table (Parquet)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.chunks import concat_tables
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    concat_tables(snakemake.input.chunks, snakemake.output.samples)

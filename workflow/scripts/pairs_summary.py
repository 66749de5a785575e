"""Rule pairs_summary: every pair's structure and selection tables -> the cross-pair summary."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.markdown_html import write_page
from kvpipe.pairs.summary import write_pairs_summary
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    tables = ("structure_metrics", "structure_facts", "selection_aggregates")
    pairs = {pair: {t: snakemake.input[t][i] for t in tables} for i, pair in enumerate(snakemake.params.pairs)}
    write_pairs_summary(pairs, dict(zip(snakemake.params.models, snakemake.input.cards, strict=True)),
                        snakemake.wildcards.dataset, Path(snakemake.output.summary).parent)
    write_page(snakemake.output.summary, snakemake.output.summary_html)  # shown inline in the HTML report

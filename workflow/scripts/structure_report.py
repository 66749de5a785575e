"""Rule structure_report: metrics table and facts -> figures and summary."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.markdown_html import write_page
from kvpipe.structure.report import write_report
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    write_report(snakemake.input.metrics, snakemake.input.facts, snakemake.wildcards.dataset,
                 Path(snakemake.output.summary).parent)
    write_page(snakemake.output.summary, snakemake.output.summary_html)  # shown inline in the HTML report

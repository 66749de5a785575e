"""Rule projection_report: answers, projector metrics, facts and timing files -> aggregates, figures, summary, timing."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.markdown_html import write_page
from kvpipe.projection.report import write_report
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    timing = {Path(path).name: path for path in snakemake.input.timing}
    write_report(snakemake.input.answers, snakemake.input.metrics, snakemake.input.facts, timing,
                 snakemake.wildcards.dataset, Path(snakemake.output.summary).parent,
                 snakemake.params.verdicts)
    write_page(snakemake.output.summary, snakemake.output.summary_html)  # shown inline in the HTML report
    write_page(snakemake.output.timing, snakemake.output.timing_html)  # shown inline in the HTML report

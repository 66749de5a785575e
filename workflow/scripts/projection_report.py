"""Rule projection_report: answers, projector metrics, timings and facts -> aggregates, figures and summary."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.projection.report import write_report
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    write_report(snakemake.input.answers, snakemake.input.metrics, snakemake.input.timings, snakemake.input.facts,
                 snakemake.wildcards.dataset, Path(snakemake.output.summary).parent)

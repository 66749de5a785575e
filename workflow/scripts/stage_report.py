"""Report rule of a stage ({stage}_report): its tables -> figures, summary (and timing), with their HTML pages."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.markdown_html import write_page
from kvpipe.stages import stage
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    stage(snakemake.params.stage).report(Path(snakemake.output.summary).parent, snakemake.wildcards.dataset,
                                         snakemake.params.get("verdicts"))
    for page in ("summary", "timing"):   # shown inline in the HTML report
        if page in snakemake.output.keys():
            write_page(snakemake.output[page], snakemake.output[f"{page}_html"])

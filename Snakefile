# kvpipe workflow: materialise models -> sample datasets -> extract KV caches -> analyse pairs
# (structure, selection, projection).
# Each analysis stage is a compute rule and a report rule. Configuration: config.yaml,
# overlays with --configfile. See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: workflow.source_path("config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/chunks.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/structure.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/projection.smk"
include: "workflow/rules/pairs.smk"


rule all:
    default_target: True
    input:
        all_targets(),

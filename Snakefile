# kvpipe workflow: materialise models -> sample datasets -> extract KV caches -> analyse pairs
# (structure of keys/values; selection transfer and QA F1).
# Configuration: config.yaml, overlays with --configfile. See README.md.

configfile: workflow.source_path("config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/structure.smk"
include: "workflow/rules/selection.smk"


rule all:
    default_target: True
    input:
        all_targets(),

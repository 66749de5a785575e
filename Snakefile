# kvpipe workflow: materialise models -> sample datasets -> extract KV caches -> analyse pairs.
# Configuration: config.yaml, overlays with --configfile. See README.md.

configfile: workflow.source_path("config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/structure.smk"


rule all:
    default_target: True
    input:
        all_targets(),

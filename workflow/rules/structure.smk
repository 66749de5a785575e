rule structure:
    """Scout -> main transfer of keys and values, layer by layer, with baselines and CIs."""
    input:
        scout=pair_kv("scout"),
        main=pair_kv("main"),
        samples=rules.sample_dataset.output.samples,
    output:
        metrics="results/structure/{dataset}/{pair}/metrics.parquet",
        facts="results/structure/{dataset}/{pair}/facts.json",
    log:
        "results/logs/structure/{dataset}/{pair}.log",
    benchmark:
        "results/benchmarks/structure/{dataset}/{pair}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("structure")  # KV statistics on the CPU: no model, no GPU
    resources:
        mem_mb=retry_mem_mb(8000),
        runtime=120,
    params:
        # with the one alignment setting structure reads (only for a pair whose tokenizers differ)
        structure=lambda wc: pair_settings(config, wc.pair, "structure")
        | {"alignment": {"pool": config["alignment"]["pool"]}},
        code=code("structure_pair.py"),
    script:
        "../scripts/structure_pair.py"


rule structure_report:
    """Figures and summary of the structural analysis, from its tables alone."""
    input:
        metrics=rules.structure.output.metrics,
        facts=rules.structure.output.facts,
    output:
        **stage_figures("structure"),
        **stage_figures("structure", pdf=True),
        summary="results/structure/{dataset}/{pair}/summary.md",
        # the report shows HTML inline (Markdown only as a download): the same page rendered
        summary_html=report(
            "results/structure/{dataset}/{pair}/summary.html",
            caption="../report/structure/summary.rst",
            category="structure",
            subcategory="{pair} on {dataset}",
            labels={"pair": "{pair}", "dataset": "{dataset}", "figure": "summary"},
        ),
    log:
        "results/logs/structure_report/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        code=code("structure_report.py"),
    script:
        "../scripts/structure_report.py"


localrules:
    structure_report,


TARGETS.append(rules.structure_report.output.summary)

rule structure:
    """Scout -> main transfer of keys and values, layer by layer, with baselines and CIs."""
    input:
        scout_kv=pair_kv("scout"),
        main_kv=pair_kv("main"),
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
        # its settings with the one alignment setting it reads (only for a pair whose tokenizers differ)
        **compute_params("structure"),
    script:
        "../scripts/stage_compute.py"


rule structure_report:
    """Figures and summary of the structural analysis, from its tables alone."""
    input:
        report_inputs("structure"),
    output:
        **report_outputs("structure"),
    log:
        "results/logs/structure_report/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        **report_params("structure"),
    script:
        "../scripts/stage_report.py"


localrules:
    structure_report,


stage_target(rules.structure_report.output.summary, "structure")

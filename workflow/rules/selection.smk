rule selection:
    """Q2C / SnapKV / random selection by scout and main, overlap, and QA F1 from pruned caches."""
    input:
        scout_dir=pair_model_card("scout"),
        main_dir=pair_model_card("main"),
        samples=rules.sample_dataset.output.samples,
    output:
        answers="results/selection/{dataset}/{pair}/answers.parquet",
        overlap="results/selection/{dataset}/{pair}/overlap.parquet",
        timing=stage_timing_files("selection"),
        facts="results/selection/{dataset}/{pair}/facts.json",
    log:
        "results/logs/selection/{dataset}/{pair}.log",
    benchmark:
        "results/benchmarks/selection/{dataset}/{pair}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("selection")
    resources:
        # both models are loaded (on one GPU): the pair's two model budgets together
        mem_mb=job_resource("mem_mb", job_pair_models),
        runtime=job_resource("runtime", job_pair_models),
        gpu=MODEL_GPUS,
    params:
        **compute_params("selection"),
    script:
        "../scripts/stage_compute.py"


rule selection_report:
    """Paired-bootstrap tables, figures and summary of selection transfer, from its tables alone."""
    input:
        report_inputs("selection"),
    output:
        **report_outputs("selection"),
        aggregates="results/selection/{dataset}/{pair}/aggregates.parquet",
    log:
        "results/logs/selection_report/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        **report_params("selection"),
    script:
        "../scripts/stage_report.py"


localrules:
    selection_report,


stage_target(rules.selection_report.output.summary, "selection")

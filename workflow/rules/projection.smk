rule projection:
    """Scout -> main KV projectors, injection into the main model, key-only transfer, chain, bytes and TTFT."""
    input:
        scout_kv=pair_kv("scout"),
        main_kv=pair_kv("main"),
        scout_dir=pair_model_card("scout"),
        main_dir=pair_model_card("main"),
        samples=rules.sample_dataset.output.samples,
        structure_metrics=projection_structure_metrics,
    output:
        answers="results/projection/{dataset}/{pair}/answers.parquet",
        metrics="results/projection/{dataset}/{pair}/projector_metrics.parquet",
        facts="results/projection/{dataset}/{pair}/facts.json",
        timing=stage_timing_files("projection"),
        projectors=directory("results/projection/{dataset}/{pair}/projectors"),
    log:
        "results/logs/projection/{dataset}/{pair}.log",
    benchmark:
        "results/benchmarks/projection/{dataset}/{pair}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("projection")
    resources:
        # both models are loaded (on one GPU): the pair's two model budgets together
        mem_mb=job_resource("mem_mb", job_pair_models),
        runtime=job_resource("runtime", job_pair_models),
        gpu=MODEL_GPUS,
    params:
        **compute_params("projection"),
    script:
        "../scripts/stage_compute.py"


rule projection_report:
    """F1 against bytes, F1 per condition, reconstruction against function, and the summary."""
    input:
        report_inputs("projection"),
    output:
        **report_outputs("projection"),
        aggregates="results/projection/{dataset}/{pair}/aggregates.parquet",
        ttft="results/projection/{dataset}/{pair}/ttft_aggregates.parquet",
    log:
        "results/logs/projection_report/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        **report_params("projection"),
    script:
        "../scripts/stage_report.py"


localrules:
    projection_report,


stage_target(rules.projection_report.output.summary, "projection")

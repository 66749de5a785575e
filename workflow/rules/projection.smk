rule projection:
    """Scout -> main KV projectors, injection into the main model, key-only transfer, chain, bytes and TTFT."""
    input:
        scout_kv=pair_kv("scout"),
        main_kv=pair_kv("main"),
        scout=pair_model_card("scout"),
        main=pair_model_card("main"),
        samples=rules.sample_dataset.output.samples,
        structure=projection_structure_metrics,
        extra=projection_extra_passages,
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
        projection=lambda wc: pair_settings(config, wc.pair, "projection"),
        prompt=config["prompt"],
        device=config["device"],
        dtype=config["extraction"]["dtype"],
        code=code("projection_pair.py"),
    script:
        "../scripts/projection_pair.py"


rule projection_report:
    """F1 against bytes, F1 per condition, reconstruction against function, and the summary."""
    input:
        answers=rules.projection.output.answers,
        metrics=rules.projection.output.metrics,
        facts=rules.projection.output.facts,
        timing=rules.projection.output.timing,
    output:
        **stage_figures("projection"),
        **stage_figures("projection", pdf=True),
        summary="results/projection/{dataset}/{pair}/summary.md",
        # the report shows HTML inline (Markdown only as a download): the same page rendered
        summary_html=report(
            "results/projection/{dataset}/{pair}/summary.html",
            caption="../report/projection/summary.rst",
            category="projection",
            subcategory="{pair} on {dataset}",
            labels={"pair": "{pair}", "dataset": "{dataset}", "figure": "summary"},
        ),
        aggregates="results/projection/{dataset}/{pair}/aggregates.parquet",
        timing="results/projection/{dataset}/{pair}/timing.md",
        # the report shows HTML inline (Markdown only as a download): the same page rendered
        timing_html=report(
            "results/projection/{dataset}/{pair}/timing.html",
            caption="../report/projection/timing.rst",
            category="projection",
            subcategory="{pair} on {dataset}",
            labels={"pair": "{pair}", "dataset": "{dataset}", "figure": "timing"},
        ),
        ttft="results/projection/{dataset}/{pair}/ttft_aggregates.parquet",
    log:
        "results/logs/projection_report/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        verdicts=config["verdicts"],
        code=code("projection_report.py"),
    script:
        "../scripts/projection_report.py"


localrules:
    projection_report,


TARGETS.append(rules.projection_report.output.summary)

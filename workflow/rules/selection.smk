rule selection_chunk:
    """Q2C / SnapKV / random selection by scout and main, overlap, and QA F1 from pruned caches, on one chunk."""
    input:
        scout=pair_model_card("scout"),
        main=pair_model_card("main"),
        chunk=rules.sample_chunk.output.samples,
        # selection.max_samples counts passages over the whole table: then every chunk reads it
        samples=selection_whole_table,
    output:
        answers="results/selection/{dataset}/{pair}/chunks/{chunk}/answers.parquet",
        overlap="results/selection/{dataset}/{pair}/chunks/{chunk}/overlap.parquet",
        timings="results/selection/{dataset}/{pair}/chunks/{chunk}/timings.parquet",
    log:
        "results/logs/selection_chunk/{dataset}/{pair}/{chunk}.log",
    benchmark:
        "results/benchmarks/selection_chunk/{dataset}/{pair}/{chunk}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("selection_chunk")
    resources:
        # both models are loaded (on one GPU): the pair's two model budgets together
        mem_mb=job_resource("mem_mb", job_pair_models),
        runtime=job_resource("runtime", job_pair_models),
        gpu=MODEL_GPUS,
    params:
        selection=selection_settings,
        prompt=config["prompt"],
        device=config["device"],
        dtype=config["extraction"]["dtype"],
        code=code("selection_pair.py"),
    script:
        "../scripts/selection_pair.py"


rule selection:
    """A pair's selection tables: its chunks' one after the other, and the run's facts."""
    input:
        chunks=chunk_files(rules.selection_chunk.output.answers),
        samples=rules.sample_dataset.output.samples,
        scout=pair_model_card("scout"),
        main=pair_model_card("main"),
    output:
        answers="results/selection/{dataset}/{pair}/answers.parquet",
        overlap="results/selection/{dataset}/{pair}/overlap.parquet",
        timing=stage_timing_files("selection"),
        facts="results/selection/{dataset}/{pair}/facts.json",
    log:
        "results/logs/selection/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        selection=selection_settings,
        code=code("selection_gather.py"),
    script:
        "../scripts/selection_gather.py"


localrules:
    selection,


rule selection_report:
    """Paired-bootstrap tables, figures and summary of selection transfer, from its tables alone."""
    input:
        answers=rules.selection.output.answers,
        overlap=rules.selection.output.overlap,
        facts=rules.selection.output.facts,
        timing=rules.selection.output.timing,
    output:
        **stage_figures("selection"),
        **stage_figures("selection", pdf=True),
        summary="results/selection/{dataset}/{pair}/summary.md",
        # the report shows HTML inline (Markdown only as a download): the same page rendered
        summary_html=report(
            "results/selection/{dataset}/{pair}/summary.html",
            caption="../report/selection/summary.rst",
            category="selection",
            subcategory="{pair} on {dataset}",
            labels={"pair": "{pair}", "dataset": "{dataset}", "figure": "summary"},
        ),
        aggregates="results/selection/{dataset}/{pair}/aggregates.parquet",
        timing="results/selection/{dataset}/{pair}/timing.md",
        # the report shows HTML inline (Markdown only as a download): the same page rendered
        timing_html=report(
            "results/selection/{dataset}/{pair}/timing.html",
            caption="../report/selection/timing.rst",
            category="selection",
            subcategory="{pair} on {dataset}",
            labels={"pair": "{pair}", "dataset": "{dataset}", "figure": "timing"},
        ),
    log:
        "results/logs/selection_report/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        verdicts=config["verdicts"],
        code=code("selection_report.py"),
    script:
        "../scripts/selection_report.py"


localrules:
    selection_report,


TARGETS.append(rules.selection_report.output.summary)

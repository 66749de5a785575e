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
        mem_mb=job_resource("mem_mb", job_pair_models, chunked=True),
        runtime=job_resource("runtime", job_pair_models, chunked=True),
        gpu=MODEL_GPUS,
    params:
        settings=stage_settings("selection"),
        code=code("selection_chunk.py"),
    script:
        "../scripts/selection_chunk.py"


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
        settings=stage_settings("selection"),
        code=code("selection_gather.py"),
    script:
        "../scripts/selection_gather.py"


localrules:
    selection,


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

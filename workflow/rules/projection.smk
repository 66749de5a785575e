rule projection_fit:
    """Scout -> main KV projectors fitted on the calibration passages, scored per layer, with the test samples."""
    input:
        scout_kv=pair_kv("scout"),
        main_kv=pair_kv("main"),
        scout=pair_model_card("scout"),
        main=pair_model_card("main"),
        samples=rules.sample_dataset.output.samples,
        structure=projection_structure_metrics,
        extra=projection_extra_passages,
    output:
        metrics="results/projection/{dataset}/{pair}/projector_metrics.parquet",
        facts="results/projection/{dataset}/{pair}/facts.json",
        answering="results/projection/{dataset}/{pair}/answering.pt",
        fit_timings="results/projection/{dataset}/{pair}/fit_timings.json",
        projectors=directory("results/projection/{dataset}/{pair}/projectors"),
    log:
        "results/logs/projection_fit/{dataset}/{pair}.log",
    benchmark:
        "results/benchmarks/projection_fit/{dataset}/{pair}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("projection_fit")
    resources:
        # both models are loaded (on one GPU): the pair's two model budgets together
        mem_mb=job_resource("mem_mb", job_pair_models),
        runtime=job_resource("runtime", job_pair_models),
        gpu=MODEL_GPUS,
    params:
        settings=stage_settings("projection"),
        code=code("projection_fit.py"),
    script:
        "../scripts/projection_fit.py"


rule projection_chunk:
    """Injection into the main model, key-only transfer, chain, bytes and TTFT on the test samples of one chunk."""
    input:
        scout=pair_model_card("scout"),
        main=pair_model_card("main"),
        chunk=rules.sample_chunk.output.samples,
        answering=rules.projection_fit.output.answering,
    output:
        answers="results/projection/{dataset}/{pair}/chunks/{chunk}/answers.parquet",
        ttft="results/projection/{dataset}/{pair}/chunks/{chunk}/ttft.parquet",
        timings="results/projection/{dataset}/{pair}/chunks/{chunk}/timings.parquet",
        seconds="results/projection/{dataset}/{pair}/chunks/{chunk}/timings.json",
    log:
        "results/logs/projection_chunk/{dataset}/{pair}/{chunk}.log",
    benchmark:
        "results/benchmarks/projection_chunk/{dataset}/{pair}/{chunk}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("projection_chunk")
    resources:
        mem_mb=job_resource("mem_mb", job_pair_models, chunked=True),
        runtime=job_resource("runtime", job_pair_models, chunked=True),
        gpu=MODEL_GPUS,
    params:
        settings=stage_settings("projection"),
        code=code("projection_chunk.py"),
    script:
        "../scripts/projection_chunk.py"


rule projection:
    """A pair's projection answers and timing files: its chunks' one after the other, with the fit's timings."""
    input:
        chunks=chunk_files(rules.projection_chunk.output.answers),
        fit_timings=rules.projection_fit.output.fit_timings,
    output:
        answers="results/projection/{dataset}/{pair}/answers.parquet",
        timing=stage_timing_files("projection"),
    log:
        "results/logs/projection/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        code=code("projection_gather.py"),
    script:
        "../scripts/projection_gather.py"


localrules:
    projection,


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

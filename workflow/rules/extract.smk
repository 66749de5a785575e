rule extract_kv:
    """Per-model KV cache of every sample, as layer-partitioned, sample-sharded Parquet."""
    input:
        model=model_card,
        samples=rules.sample_dataset.output.samples,
    output:
        # Only the manifest is declared: shards beside it survive a failed job, and the
        # rerun skips those the progress file proves complete.
        manifest="results/kv/{dataset}/{model}/manifest.json",
    log:
        "results/logs/extract_kv/{dataset}/{model}.log",
    benchmark:
        "results/benchmarks/extract_kv/{dataset}/{model}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("extract_kv")
    resources:
        mem_mb=job_resource("mem_mb", job_model),
        runtime=job_resource("runtime", job_model),
        gpu=MODEL_GPUS,
    params:
        extraction=config["extraction"],
        prompt=config["prompt"],
        device=config["device"],
        code=code("extract_kv.py"),
    script:
        "../scripts/extract_kv.py"


TARGETS.append(rules.extract_kv.output.manifest)

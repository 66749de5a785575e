rule extract_kv_chunk:
    """Per-model KV cache of one chunk's samples, as layer-partitioned, sample-sharded Parquet."""
    input:
        model=model_card,
        samples=rules.sample_chunk.output.samples,
    output:
        # Only the manifest is declared: shards beside it survive a failed job, and the
        # rerun skips those the progress file proves complete.
        manifest="results/kv/{dataset}/{model}/chunks/{chunk}/manifest.json",
    log:
        "results/logs/extract_kv_chunk/{dataset}/{model}/{chunk}.log",
    benchmark:
        "results/benchmarks/extract_kv_chunk/{dataset}/{model}/{chunk}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("extract_kv_chunk")
    resources:
        mem_mb=job_resource("mem_mb", job_model, chunked=True),
        runtime=job_resource("runtime", job_model, chunked=True),
        gpu=MODEL_GPUS,
    params:
        extraction=config["extraction"],
        prompt=config["prompt"],
        device=config["device"],
        code=code("extract_kv.py"),
    script:
        "../scripts/extract_kv.py"


rule extract_kv:
    """A model's KV dataset: its chunks' shards linked under their global indices, and one manifest."""
    input:
        chunks=chunk_files(rules.extract_kv_chunk.output.manifest),
        samples=rules.sample_dataset.output.samples,
    output:
        manifest="results/kv/{dataset}/{model}/manifest.json",
    log:
        "results/logs/extract_kv/{dataset}/{model}.log",
    conda:
        CONDA_ENV
    params:
        code=code("extract_kv_gather.py"),
    script:
        "../scripts/extract_kv_gather.py"


localrules:
    extract_kv,


TARGETS.append(rules.extract_kv.output.manifest)

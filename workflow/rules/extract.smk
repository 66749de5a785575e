rule extract_kv:
    """Per-model KV cache of every sample, as layer-partitioned, sample-sharded Parquet."""
    input:
        model=lambda wc: model_card(wc.model),
        samples="results/data/{dataset}/samples.parquet",
    output:
        # Only the manifest is declared: shards beside it survive a failed job, and the
        # rerun skips those the progress file proves complete.
        manifest=kv_manifest("{dataset}", "{model}"),
    params:
        extraction=config["extraction"],
        prompt=config["prompt"],
        device=config["device"],
        code=code_hash("extract"),
    log:
        "results/logs/extract_kv/{dataset}/{model}.log",
    benchmark:
        "results/benchmarks/extract_kv/{dataset}/{model}.tsv"
    resources:
        mem_mb=lambda wc: model_resources(wc.model).get("mem_mb"),
        runtime=lambda wc: model_resources(wc.model).get("runtime"),
        gpu=model_gpus(),
    conda:
        "../../envs/kvpipe.yaml"
    script:
        "../scripts/extract_kv.py"

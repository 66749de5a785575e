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
        "../../envs/kvpipe.yaml"
    threads: workflow.cores  # torch and numpy use every core the run may use
    resources:
        mem_mb=lambda wc: model_resources(wc.model).get("mem_mb"),
        runtime=lambda wc: model_resources(wc.model).get("runtime"),
        gpu=model_gpus(),
    params:
        extraction=config["extraction"],
        prompt=config["prompt"],
        device=config["device"],
        code=code("extract_kv.py"),
    script:
        "../scripts/extract_kv.py"


TARGETS.append(rules.extract_kv.output.manifest)

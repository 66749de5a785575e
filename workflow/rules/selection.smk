rule selection:
    """Q2C / SnapKV / random selection by scout and main, overlap, and QA F1 from pruned caches."""
    input:
        scout=lambda wc: model_card(config["pairs"][wc.pair]["scout"]),
        main=lambda wc: model_card(config["pairs"][wc.pair]["main"]),
        samples="results/data/{dataset}/samples.parquet",
    output:
        summary="results/selection/{dataset}/{pair}/summary.md",
        answers="results/selection/{dataset}/{pair}/answers.parquet",
        overlap="results/selection/{dataset}/{pair}/overlap.parquet",
        timings="results/selection/{dataset}/{pair}/timings.parquet",
        aggregates="results/selection/{dataset}/{pair}/aggregates.parquet",
        figures=expand(
            "results/selection/{{dataset}}/{{pair}}/figures/{name}.{ext}",
            name=SELECTION_FIGURES,
            ext=("png", "pdf"),
        ),
    params:
        selection=config["selection"],
        prompt=config["prompt"],
        device=config["device"],
        dtype=config["extraction"]["dtype"],
        code=code_hash("selection"),
    log:
        "results/logs/selection/{dataset}/{pair}.log",
    benchmark:
        "results/benchmarks/selection/{dataset}/{pair}.tsv"
    resources:
        # both models are loaded: the pair's two model budgets together
        mem_mb=lambda wc: sum(model_resources(m).get("mem_mb") for m in pair_models(wc.pair)),
        runtime=lambda wc: max(model_resources(m).get("runtime") for m in pair_models(wc.pair)),
        gpu=model_gpus(),
    conda:
        "../../envs/kvpipe.yaml"
    script:
        "../scripts/selection_pair.py"

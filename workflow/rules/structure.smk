rule structure:
    """Scout -> main transfer of keys and values, layer by layer, with baselines and CIs."""
    input:
        scout=lambda wc: kv_manifest(wc.dataset, config["pairs"][wc.pair]["scout"]),
        main=lambda wc: kv_manifest(wc.dataset, config["pairs"][wc.pair]["main"]),
    output:
        metrics="results/structure/{dataset}/{pair}/metrics.parquet",
        summary="results/structure/{dataset}/{pair}/summary.md",
        facts="results/structure/{dataset}/{pair}/facts.json",
        figures=expand(
            "results/structure/{{dataset}}/{{pair}}/figures/{name}.{ext}",
            name=STRUCTURE_FIGURES,
            ext=("png", "pdf"),
        ),
    params:
        structure=config["structure"],
        code=code_hash("structure"),
    log:
        "results/logs/structure/{dataset}/{pair}.log",
    benchmark:
        "results/benchmarks/structure/{dataset}/{pair}.tsv"
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/kvpipe.yaml"
    script:
        "../scripts/structure_pair.py"

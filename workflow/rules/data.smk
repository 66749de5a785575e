rule sample_dataset:
    """Seeded sample of a dataset, shared by every model; prompt length bounded by all their tokenizers.

    The model inputs are ancient(): re-materialising one model must not resample the
    dataset (and so rerun every model); extract_kv checks that the samples still fit.
    """
    input:
        models=[ancient(model_card(m)) for m in run_models(config)],
    output:
        samples="results/data/{dataset}/samples.parquet",
    params:
        dataset=lambda wc: config["datasets"][wc.dataset],
        sampling=config["sampling"],
        prompt=config["prompt"],
        code=code_hash("sample"),
    log:
        "results/logs/sample_dataset/{dataset}.log",
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/kvpipe.yaml"
    script:
        "../scripts/sample_dataset.py"

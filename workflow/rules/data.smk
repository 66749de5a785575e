rule sample_dataset:
    """Seeded sample of a dataset, shared by every model; depends on the dataset and `sampling` only."""
    input:
        data=dataset_files,
        tokenizer=sampling_tokenizer_card,
    output:
        samples="results/data/{dataset}/samples.parquet",
    log:
        "results/logs/sample_dataset/{dataset}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=retry_mem_mb(4000),
        runtime=30,
    params:
        dataset=lambda wc: config["datasets"][wc.dataset],
        sampling=config["sampling"],
        prompt=config["prompt"],
        tokenizer=sampling_tokenizer,
        code=code("sample_dataset.py"),
    script:
        "../scripts/sample_dataset.py"

rule sample_chunk:
    """Samples [c x chunk_size, (c+1) x chunk_size) of a dataset's seeded sample, shared by every model; depends on
    the dataset, `sampling` and the chunk's own range only (not on sampling.n), so growing n keeps full chunks.
    """
    input:
        data=dataset_files,
        tokenizer=sampling_tokenizer_card,
    output:
        samples="results/data/{dataset}/chunks/{chunk}.parquet",
    log:
        "results/logs/sample_chunk/{dataset}/{chunk}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=retry_mem_mb(4000),
        runtime=30,
    params:
        dataset=lambda wc: config["datasets"][wc.dataset],
        sampling={k: v for k, v in config["sampling"].items() if k != "n"},
        samples=lambda wc: chunk_samples(wc.chunk),
        prompt=config["prompt"],
        tokenizer=sampling_tokenizer,
        code=code("sample_chunk.py"),
    script:
        "../scripts/sample_chunk.py"


rule sample_dataset:
    """The dataset's sample table: its chunks one after the other."""
    input:
        chunks=chunk_files(rules.sample_chunk.output.samples),
    output:
        samples="results/data/{dataset}/samples.parquet",
    log:
        "results/logs/sample_dataset/{dataset}.log",
    conda:
        CONDA_ENV
    params:
        code=code("sample_dataset.py"),
    script:
        "../scripts/sample_dataset.py"


localrules:
    sample_dataset,

rule materialize_model:
    """Turn a model source into results/models/{model}/ (safetensors, tokenizer, card)."""
    input:
        model_source_files,
    output:
        card="results/models/{model}/kvpipe_model.json",
    log:
        "results/logs/materialize_model/{model}.log",
    benchmark:
        "results/benchmarks/materialize_model/{model}.tsv"
    # run.materialize_on_submit_host: on the submit host, for compute nodes without internet
    localrule: config["run"]["materialize_on_submit_host"]
    conda:
        CONDA_ENV
    threads: rule_threads("materialize_model")
    resources:
        # CPU only: converting and hashing weights needs no GPU
        mem_mb=job_resource("mem_mb", job_model),
        runtime=job_resource("runtime", job_model),
    params:
        # the source without the declared tokenizer name (kvpipe.shared_tokenizer): declaring it reruns nothing
        spec=lambda wc: source_spec(config["models"][wc.model]),
        code=code("materialize_model.py"),
    script:
        "../scripts/materialize_model.py"

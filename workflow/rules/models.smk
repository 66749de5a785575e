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
    conda:
        "../../envs/kvpipe.yaml"
    threads: workflow.cores  # torch and numpy use every core the run may use
    resources:
        mem_mb=lambda wc: model_resources(wc.model).get("mem_mb"),
        runtime=lambda wc: model_resources(wc.model).get("runtime"),
    params:
        spec=lambda wc: config["models"][wc.model],
        code=code("materialize_model.py"),
    script:
        "../scripts/materialize_model.py"

rule materialize_model:
    """Turn a model source into results/models/{model}/ (safetensors, tokenizer, card)."""
    output:
        card="results/models/{model}/kvpipe_model.json",
    params:
        spec=lambda wc: config["models"][wc.model],
        code=code_hash("materialize"),
    log:
        "results/logs/materialize_model/{model}.log",
    benchmark:
        "results/benchmarks/materialize_model/{model}.tsv"
    resources:
        mem_mb=lambda wc: model_resources(wc.model).get("mem_mb"),
        runtime=lambda wc: model_resources(wc.model).get("runtime"),
    conda:
        "../../envs/kvpipe.yaml"
    script:
        "../scripts/materialize_model.py"

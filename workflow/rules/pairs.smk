rule pairs_summary:
    """The run's pairs side by side (family, key and value transfer, Q2C overlap, forward and reverse
    ΔF1) and the notes' cross-family predictions, from the stages' tables."""
    input:
        structure_metrics=expand(
            "results/structure/{{dataset}}/{pair}/metrics.parquet", pair=RUN_PAIRS
        ),
        structure_facts=expand(
            "results/structure/{{dataset}}/{pair}/facts.json", pair=RUN_PAIRS
        ),
        selection_aggregates=expand(
            "results/selection/{{dataset}}/{pair}/aggregates.parquet", pair=RUN_PAIRS
        ),
        cards=expand("results/models/{model}/kvpipe_model.json", model=RUN_MODELS),
    output:
        summary="results/pairs/{dataset}/summary.md",
        # the report shows HTML inline (Markdown only as a download): the same page rendered
        summary_html=report(
            "results/pairs/{dataset}/summary.html",
            caption="../report/pairs/summary.rst",
            category="pairs",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "summary"},
        ),
        table="results/pairs/{dataset}/pairs.parquet",
    log:
        "results/logs/pairs_summary/{dataset}.log",
    conda:
        CONDA_ENV
    params:
        pairs=RUN_PAIRS,
        models=RUN_MODELS,
        code=code("pairs_summary.py"),
    script:
        "../scripts/pairs_summary.py"


localrules:
    pairs_summary,


stage_target(rules.pairs_summary.output.summary, "structure", "selection")

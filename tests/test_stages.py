"""A stage is added in four places (the README's checklist): its subpackage, its rule file, its schema section
and one `include:` line. A throwaway stage, added so to a copy of the checkout, is found by the CLI, validated by
the schema, built by the smoke DAG and shown in its HTML report."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, copy_checkout, planned_jobs, snakemake

from kvpipe.stages import stages

PACKAGE = {  # src/kvpipe/keynorm/: the descriptor, the compute step (mean key norm per layer) and the report
    "__init__.py": '''"""Throwaway stage: mean norm of each layer's keys (or values), scout and main."""

from kvpipe.stages import MAIN_KV, SCOUT_KV, Stage

STAGE = Stage(name="keynorm", help="Mean key norm per layer of a pair's KV datasets.", order=40,
              inputs=(SCOUT_KV, MAIN_KV), tables=("norms.parquet",))
''',
    "stage.py": '''"""Mean norm per layer."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvpipe.io import write_parquet
from kvpipe.kv import store


def compute(inputs: Mapping[str, Path | None], pair: str, params: Mapping[str, Any], out_dir: Path) -> None:
    """norms.parquet: role, layer and the mean norm of the configured kind's vectors."""
    kind, rows = params["keynorm"]["kind"], []
    for role in ("scout", "main"):
        root = inputs[f"{role}_kv"]
        for layer in store.load_manifest(root)["layers"]:
            norms = np.linalg.norm(store.matrix(store.read_layer(root, layer), kind), axis=1)
            rows.append({"pair": pair, "role": role, "layer": layer, "mean_norm": float(norms.mean())})
    write_parquet(pd.DataFrame(rows), out_dir / "norms.parquet")
''',
    "report.py": '''"""Summary of the norms."""

from pathlib import Path

import pandas as pd

from kvpipe.io import write_text

FIGURES = ()


def write_report(norms: Path, dataset: str, out_dir: Path) -> None:
    """summary.md: one table row per role and layer."""
    table = pd.read_parquet(norms)
    rows = [f"| {r.role} | {r.layer} | {r.mean_norm:.4f} |" for r in table.itertuples()]
    write_text(Path(out_dir) / "summary.md", "\\n".join([f"# Mean norm per layer on {dataset}", "",
                                                         "| role | layer | mean norm |", "|---|---|---|", *rows, ""]))
''',
}

RULES = '''rule keynorm:
    """Mean key norm per layer of the pair's scout and main."""
    input:
        scout_kv=pair_kv("scout"),
        main_kv=pair_kv("main"),
    output:
        norms="results/keynorm/{dataset}/{pair}/norms.parquet",
    log:
        "results/logs/keynorm/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    threads: rule_threads("keynorm")
    params:
        **compute_params("keynorm"),
    script:
        "../scripts/stage_compute.py"


rule keynorm_report:
    """The norms as a summary."""
    input:
        report_inputs("keynorm"),
    output:
        **report_outputs("keynorm"),
    log:
        "results/logs/keynorm_report/{dataset}/{pair}.log",
    conda:
        CONDA_ENV
    params:
        **report_params("keynorm"),
    script:
        "../scripts/stage_report.py"


localrules:
    keynorm_report,


stage_target(rules.keynorm_report.output.summary, "keynorm")
'''

SCHEMA = '''  keynorm:
    type: object
    default: {}
    additionalProperties: false
    properties:
      kind: {enum: [key, value], default: key}
'''


def add_stage(checkout: Path) -> None:
    """The four places, and nothing else."""
    package = checkout / "src" / "kvpipe" / "keynorm"
    package.mkdir()
    for name, text in PACKAGE.items():
        (package / name).write_text(text)
    (checkout / "workflow" / "rules" / "keynorm.smk").write_text(RULES)
    schema = checkout / "workflow" / "schemas" / "config.schema.yaml"
    schema.write_text(schema.read_text() + SCHEMA)   # the last section of the schema's properties
    snakefile = checkout / "Snakefile"
    include = 'include: "workflow/rules/projection.smk"\n'
    snakefile.write_text(snakefile.read_text().replace(include, include + 'include: "workflow/rules/keynorm.smk"\n'))


def test_every_stage_is_a_subpackage_declaring_itself_with_its_report_module():
    for stage in stages():
        assert (REPO / "src" / "kvpipe" / stage.name / "__init__.py").read_text().count("STAGE = Stage(") == 1
        assert (REPO / "workflow" / "rules" / f"{stage.name}.smk").is_file()
        assert stage.tables and all(isinstance(name, str) for name in stage.figures)


@pytest.fixture
def extra_package(tmp_path, monkeypatch):
    """A directory on kvpipe's package path (as if beside the checkout's subpackages); the registry rebuilt."""
    import kvpipe
    from kvpipe import stages as registry

    monkeypatch.setattr(kvpipe, "__path__", [*kvpipe.__path__, str(tmp_path)])
    registry.stages.cache_clear()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(("kvpipe.zeta", "kvpipe.early", "kvpipe.helpers"))]:
        del sys.modules[name]
    registry.stages.cache_clear()


def declare(root: Path, package: str, stage: str, order: int) -> None:
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(
        f"from kvpipe.stages import SAMPLES, Stage\n\nSTAGE = Stage(name={stage!r}, help='h', order={order}, "
        "inputs=(SAMPLES,), tables=('t.parquet',))\n")


def test_stages_are_found_in_subpackages_in_pipeline_order(extra_package):
    from kvpipe.stages import stages

    declare(extra_package, "early", "early", 5)
    declare(extra_package, "zeta", "zeta", 15)
    (extra_package / "helpers").mkdir()   # a subpackage that declares nothing is no stage
    (extra_package / "helpers" / "__init__.py").write_text('"""Shared code."""\n')
    assert [s.name for s in stages()] == ["early", "structure", "zeta", "selection", "projection"]


def test_a_stage_named_other_than_its_subpackage_is_one_line(extra_package):
    from kvpipe.errors import KvpipeError
    from kvpipe.stages import stages

    declare(extra_package, "zeta", "zeta2", 15)
    with pytest.raises(KvpipeError, match=r"^kvpipe.zeta.STAGE: must be a kvpipe.stages.Stage named 'zeta'$"):
        stages()


@pytest.mark.slow
def test_a_stage_added_in_four_places_is_built_and_reported(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    add_stage(checkout)
    env = {"PYTHONPATH": str(checkout / "src"), "PATH": "/usr/bin:/bin"}
    cli = subprocess.run([sys.executable, "-m", "kvpipe.cli", "keynorm", "--help"], capture_output=True, text=True,
                         env=env)
    assert cli.returncode == 0 and "--scout-kv" in cli.stdout and "--main-kv" in cli.stdout, cli.stderr
    plan = planned_jobs(snakemake(checkout, "-n"))
    assert plan["keynorm"] == plan["keynorm_report"] == plan["structure"] == 1   # the default runs every stage
    target = "results/keynorm/synthetic-small/tiny/summary.md"
    proc = snakemake(checkout, target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    norms = pd.read_parquet(checkout / "results/keynorm/synthetic-small/tiny/norms.parquet")
    assert sorted(norms.groupby("role")["layer"].count().items()) == [("main", 3), ("scout", 2)]   # tiny models
    assert (norms["mean_norm"] > 0).all()
    summary = (checkout / target).read_text()
    assert summary.startswith("# Mean norm per layer on synthetic-small") and "| scout | 1 |" in summary
    proc = snakemake(checkout, "--report", "results/report.html", target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "keynorm/synthetic-small/tiny/summary.html" in (checkout / "results/report.html").read_text(errors="replace")
    only = tmp_path / "only.yaml"
    only.write_text("run: {stages: [keynorm]}\nkeynorm: {kind: value}\n")
    plan = planned_jobs(snakemake(checkout, "-n", overlays=(only,)))
    assert plan["keynorm"] == 1 and "structure" not in plan and "selection" not in plan   # its setting reruns it

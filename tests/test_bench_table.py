"""The README's benchmark table is the one bench/run_all.py writes from the recorded bench/results files."""

import importlib.util
import json
import sys

from conftest import REPO


def _bench(name: str):
    """bench/{name}.py as a module (benchkit beside it on the path, as when it runs as a script)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # (a dataclass resolves its annotations through its module)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_written_from_the_recorded_results():
    run_all = _bench("run_all")
    readme = (REPO / "README.md").read_text()
    block = readme.split(run_all.BEGIN)[1].split(run_all.END)[0]
    assert block.strip() == run_all.table().strip()
    assert (REPO / "bench" / "results" / "TABLE.md").read_text() == run_all.table()
    rows = run_all.rows()
    assert len(rows) >= 8 and all((REPO / "bench" / "results" / source).exists() for *_, source in rows)
    assert {"met", "**missed**", "", "no verdict"} >= {verdict for _, _, _, verdict, _ in rows}


def test_readme_findings_are_rendered_from_the_recorded_results():
    """Every number of 'What it has measured so far' comes from bench/findings.py reading bench/results/."""
    findings = _bench("findings")
    readme = (REPO / "README.md").read_text()
    block = readme.split(findings.BEGIN)[1].split(findings.END)[0]
    assert block.strip() == findings.render().strip()
    cited = [part.split("`")[0] for part in block.split("`bench/results/")[1:]]
    assert len(cited) >= 8 and all((REPO / "bench" / "results" / path).exists() for path in cited)


def test_readme_test_durations_are_rendered_from_the_recorded_run():
    durations = _bench("test_durations")
    record = json.loads(durations.RECORD.read_text())
    readme = (REPO / "README.md").read_text()
    assert readme.split(durations.BEGIN)[1].split(durations.END)[0].strip() == durations.render(record).strip()
    runs = record["runs"]
    assert [] in [run["pytest_args"] for run in runs], "the whole suite's run is the table"
    for run in runs:
        assert all((REPO / path).is_file() for path in run["files"]) and run["wall_s"] > 0 and run["cpu_s"] > 0


def test_a_benchmark_uses_the_dataset_its_overlays_name(monkeypatch, tmp_path):
    """bench_config: SQuAD v2 from --squad by default and under overlays that name no dataset or keep it, else the one
    dataset the last overlay setting run.datasets names; two named datasets are an error."""
    import pytest

    monkeypatch.chdir(REPO)
    benchkit = _bench("benchkit")
    squad, overlays = REPO / "somewhere" / "dev.json", REPO / "bench" / "overlays"
    config, dataset, spec, files = benchkit.bench_config([], squad)
    assert (dataset, spec["path"], files[-1].name) == ("squad_v2", str(squad), "squad_v2.yaml")
    config, dataset, spec, files = benchkit.bench_config([overlays / "projection_answerable.yaml"], squad)
    assert dataset == "squad_v2" and config["sampling"]["answerable_only"]   # a grid-only overlay keeps SQuAD v2
    config, dataset, spec, files = benchkit.bench_config([overlays / "selection_squad200.yaml"], squad)
    assert dataset == "squad_v2" and spec["path"] == str(squad) and files[-1].name == "selection_squad200.yaml"
    assert config["selection"]["methods"] == ["q2c", "random"] and config["selection"]["max_samples"] is None
    config, dataset, spec, files = benchkit.bench_config([overlays / "selection_long.yaml"], squad)
    assert (dataset, spec["mode"], [f.name for f in files]) == ("long", "long", ["config.yaml", "selection_long.yaml"])
    assert config["sampling"]["max_context_tokens"] == 8192
    two = tmp_path / "two.yaml"
    two.write_text("run: {datasets: [synthetic, long]}\n")
    with pytest.raises(SystemExit, match="two.yaml: run.datasets names"):
        benchkit.bench_config([overlays / "selection_long.yaml", two], squad)


def test_the_decoding_a_b_alternates_and_compares_medians_and_tokens():
    """benchkit.stock_against_kvpipe runs stock, kvpipe, stock, kvpipe; greedy_steps feeds each argmax back."""
    import torch

    benchkit = _bench("benchkit")
    order, seconds = [], {"stock": [[4.0, 2.0], [3.0, 5.0]], "kvpipe": [[1.0, 2.0], [2.0, 9.0]]}
    setups = {name: (lambda name=name: order.append(name)) for name in ("stock", "kvpipe")}
    record = benchkit.stock_against_kvpipe(setups, lambda: (seconds[order[-1]].pop(0), [[7]]))
    assert order == ["stock", "kvpipe", "stock", "kvpipe"]
    assert record == {"step_s": {"stock": 3.5, "kvpipe": 2.0}, "ratio_stock_over_kvpipe": 1.75, "same_tokens": True}

    class Next:   # logits whose argmax is the fed token + 1
        def __call__(self, input_ids, use_cache, step):
            return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids + 1 + 0 * step, 20).float()})

    _, tokens = benchkit.greedy_steps(Next(), torch.tensor([[1], [5]]), 3, lambda step: {"step": step})
    assert tokens == [[2, 6], [3, 7], [4, 8]]

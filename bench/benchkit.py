"""What the benchmarks share: the targets, where records go, child processes that measure their own peak memory,
the scaled random pair, and a stage's report rewritten from its tables.

Every script under bench/ imports this module (it sits beside them on the path of a script run as
`python bench/NAME.py`); the results layout of a finished workflow run comes from kvpipe.layout.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "bench" / "results"  # the committed records every number of the README comes from


@dataclass(frozen=True)
class Target:
    """A measured value's target: at most (≤) or at least (≥) a bound."""

    bound: float
    at_least: bool = False

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def text(self, unit: str = "") -> str:
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}{unit}"

    def verdict(self, value: float) -> str:
        return "met" if self.met(value) else "**missed**"


TARGETS = {  # the one place a benchmark's target is set: records and bench/run_all.py's table read it here
    "extraction_over_bare": Target(1.15),
    "rss_ratio_4x_over_1x": Target(1.1),
    "snakemake_over_direct": Target(1.1),
    "kvpress_speedup": Target(3, at_least=True),   # on the same work, 3 retentions per prefill
    "kvpress_speedup_9": Target(6, at_least=True),   # on the same work, 9 retentions per prefill
    "kvpress_kept_identical": Target(1, at_least=True),   # share of (question, retention, layer, KV head)
    "kvpress_same_answers": Target(0.95, at_least=True),
    "projection_fit_total_s": Target(600),
    "ttft_ratio_injected": Target(0.3),
    "selection_overhead_ratio": Target(0.10),
    "selection_wall_s": Target(3600),
}


def write_record(path: Path, record: dict[str, Any], indent: int = 2) -> None:
    """A benchmark's JSON record (its directory made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")


def f1_text(value: float | None) -> str:
    """An F1 of a record as the README writes it ("—" where the record has none)."""
    return "—" if value is None else f"{value:.3f}"


def greedy_steps(
    model: Any, nxt: Any, steps: int, inputs: Callable[[int], dict[str, Any]]
) -> tuple[list[float], list[list[int]]]:
    """Seconds and greedy tokens of `steps` decoding steps of a model from the tokens nxt [rows, 1]; inputs(step)
    gives a step's other arguments (cache, mask, positions), built before its clock starts."""
    seconds, tokens = [], []
    for step in range(steps):
        kwargs = inputs(step)
        started = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **kwargs)
        nxt = out.logits[:, -1].argmax(-1)[:, None]
        seconds.append(time.perf_counter() - started)
        tokens.append(nxt[:, 0].tolist())
    return seconds, tokens


def stock_against_kvpipe(setups: dict[str, Callable[[], Any]], run: Callable[[], tuple[list[float], list]]) -> dict[str, Any]:
    """An A/B of decoding steps in one process: setups "stock" and "kvpipe" each applied before run(), alternating
    stock, kvpipe, stock, kvpipe; the median step of each, their ratio and whether both decoded the same tokens."""
    runs: dict[str, dict[str, Any]] = {}
    for name in (*setups, *setups):
        setups[name]()
        seconds, tokens = run()
        runs.setdefault(name, {"seconds": [], "tokens": tokens})["seconds"] += seconds
    step = {name: statistics.median(r["seconds"]) for name, r in runs.items()}
    return {"step_s": {k: round(v, 4) for k, v in step.items()},
            "ratio_stock_over_kvpipe": round(step["stock"] / step["kvpipe"], 2),
            "same_tokens": runs["stock"]["tokens"] == runs["kvpipe"]["tokens"]}


def peak_rss_mb() -> int:
    """This process's own peak resident memory in MB.

    Linux's VmHWM, not getrusage's ru_maxrss: a spawned child's ru_maxrss keeps the high-water mark of
    the parent it was forked from (it survives exec), so it would report at least the parent's size.
    """
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2))


def _call(func: Callable[..., Any], args: tuple, queue: mp.Queue) -> None:
    queue.put(func(*args))


def in_child(func: Callable[..., Any], *args: Any) -> Any:
    """func(*args) in a fresh spawned process (so the peak RSS it reports is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(func, args, queue))
    proc.start()
    while True:  # a child that dies (an exception, the OOM killer) never puts a result: say so, do not wait forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{func.__name__} died in its child process (exit code {proc.exitcode})") from None
    proc.join()
    return result


# Two random-initialised Qwen2 models with the default pair's KV shapes scaled down in depth (scout 8 layers x 2 KV
# heads x 64, main 8 layers x 2 x 128, one shared tokenizer): the memory benchmarks' pair.
SCOUT = {
    "source": "tiny",
    "arch": "qwen2",
    "layers": 8,
    "hidden_size": 256,
    "heads": 8,
    "kv_heads": 2,
    "intermediate_size": 512,
    "vocab_size": 512,
    "tokenizer_seed": 0,
    "seed": 1,
}
MAIN = SCOUT | {"hidden_size": 512, "heads": 8, "intermediate_size": 1024, "seed": 2}


def scaled_samples(models: dict[str, Path], n: int, config: dict, samples: Path) -> Path:
    """n synthetic samples (one passage each, all answerable) counted with the scout's tokenizer."""
    from kvpipe.data.sampling import sample_to_file

    dataset = {"source": "synthetic", "seed": 0, "passages": n, "entities_per_passage": 2, "unanswerable_fraction": 0.0}
    sampling = {"n": n, "seed": 0, "answerable_only": True, "tokenizer": "scout", "max_context_tokens": 4096}
    sample_to_file("bench", dataset, models["scout"], config["prompt"], sampling, samples)
    return samples


def scaled_pair(root: Path, n: int, config: dict) -> tuple[dict[str, Path], Path, dict[str, Path]]:
    """The scaled random pair under root (materialised once), n synthetic samples and both models' KV of them:
    (model dirs, samples file, KV dirs) by role."""
    from kvpipe.kv.extract import extract
    from kvpipe.models.materialize import materialize

    models = {"scout": root / "scout", "main": root / "main"}
    for role, spec in (("scout", SCOUT), ("main", MAIN)):
        if not models[role].exists():
            materialize(role, spec, models[role])
    samples = scaled_samples(models, n, config, root / f"samples{n}.parquet")
    kv = {role: root / f"kv{n}" / role for role in models}
    for role in models:
        extract(models[role], samples, kv[role], config["extraction"] | {"dtype": "float32"}, config["prompt"], "cpu")
    return models, samples, kv


def bench_config(overlays: list[Path], squad: Path) -> tuple[dict[str, Any], str, dict[str, Any], list[Path]]:
    """(config, dataset, dataset spec, config files) of a benchmark: SQuAD v2 from --squad (config.yaml,
    config/squad_v2.yaml and the overlays), or the one dataset the last overlay that sets run.datasets names."""
    import yaml

    from kvpipe.config import load_config

    named = [(o, (yaml.safe_load(Path(o).read_text()) or {}).get("run", {}).get("datasets")) for o in overlays]
    named = [(o, d) for o, d in named if d]
    if named and "squad_v2" not in named[-1][1]:
        overlay, datasets = named[-1]
        if len(datasets) != 1:
            raise SystemExit(f"{overlay}: run.datasets names {datasets}; a benchmark samples one dataset")
        files = [Path("config.yaml"), *overlays]
        config = load_config(files)
        return config, datasets[0], config["datasets"][datasets[0]], files
    files = [Path("config.yaml"), Path("config/squad_v2.yaml"), *overlays]
    config = load_config(files)
    return config, "squad_v2", config["datasets"]["squad_v2"] | {"path": str(squad)}, files


def record_path(kind: str, name: str) -> Path:
    """bench/results/{kind}.json, or {kind}_{name}.json for a named variant."""
    return RECORDS / ("_".join(filter(None, (kind, name))) + ".json")


def bench_samples(config: dict[str, Any], dataset: str, spec: dict[str, Any], tokenizer: Path, n: int, out: Path) -> None:
    """Sample n questions of a benchmark's dataset (bench_config's config, dataset and spec) with the production sampler
    into out."""
    from kvpipe.data.sampling import sample_to_file

    sample_to_file(dataset, spec, tokenizer, config["prompt"], config["sampling"] | {"n": n}, out)


def stage_report(stage: str, out_dir: Path, dataset: str, *configs: Path) -> None:
    """Rewrite a stage's report (aggregates, figures, summary, timing) from the tables in out_dir, as
    `kvpipe report` does (configs: the configuration files, default config.yaml)."""
    from kvpipe.cli import main

    main(["report", stage, "--dir", str(out_dir), "--dataset", dataset, *(a for c in configs for a in ("-c", str(c)))])

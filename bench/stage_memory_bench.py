"""Peak memory of the selection stage and of the whole projection stage at 1x and 4x samples: neither may grow with n.

Uses benchkit's scaled random pair (the default pair's KV shapes, 8 layers, one shared
tokenizer): n and 4n synthetic samples, both models' KV extracted with the production code, then
each stage as the pipeline runs it (`run_selection` over every sample with the default grid;
`run_projection` with the default settings: every projector and objective, every condition) in a
fresh child process. Recorded per run: peak RSS, the child's peak before the stage (interpreter,
torch, kvpipe) and the wall time; for the projection stage also the peak of each of its phases
(Linux: the high-water mark is reset at each phase's start through /proc/self/clear_refs).
Writes bench/results/stage_memory.json, one block per stage with its n; `--stages` reruns some stages
and keeps the others' blocks. The projection stage's attention objective draws up to
`projection.attention.samples` + `held_out` (12 + 4) calibration samples: its 1x must be at least 36
samples for both runs to hold the same number (calibration is half the samples, validation a third of it).

    python bench/stage_memory_bench.py --stages selection --n 12
    python bench/stage_memory_bench.py --stages projection --n 36
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchkit import RECORDS, in_child, peak_rss_mb, scaled_pair, write_record

from kvpipe.config import load_config

CLEAR_REFS = Path("/proc/self/clear_refs")


class PhasePeaks:
    """Peak RSS per phase of one call: a phase runs from the first call of its marked function to the next mark."""

    def __init__(self) -> None:
        self.current, self.peaks = "setup", {}

    def mark(self, phase: str) -> None:
        """Close the current phase (its peak) and start `phase` with a fresh high-water mark."""
        self.peaks[self.current] = peak_rss_mb()
        CLEAR_REFS.write_text("5")
        self.current = phase

    def starts(self, owner: object, attr: str, phase: str) -> None:
        """Make the first call of owner.attr start `phase`."""
        func = getattr(owner, attr)

        def marked(*args, **kwargs):
            if phase not in self.peaks and self.current != phase:
                self.mark(phase)
            return func(*args, **kwargs)

        setattr(owner, attr, marked)


def _selection(scout: Path, main: Path, samples: Path, cfg: dict, prompt: dict, out: Path) -> dict:
    from kvpipe.selection.stage import run_selection

    before, start = peak_rss_mb(), time.perf_counter()
    run_selection(scout, main, samples, "bench", cfg, prompt, "cpu", "float32", out)
    return {"seconds": round(time.perf_counter() - start, 1), "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def _projection(kv: dict[str, Path], models: dict[str, Path], samples: Path, cfg: dict, prompt: dict, out: Path) -> dict:
    from kvpipe.projection import stage
    from kvpipe.projection.answer import Answerer
    from kvpipe.projection.calibration import Calibration

    phases = PhasePeaks() if CLEAR_REFS.exists() else None
    if phases:
        for owner, attr, phase in ((Calibration, "statistics", "statistics"), (stage, "attention_data", "attention data"),
                                   (stage, "fit_all", "fit and save"), (stage, "projector_metrics", "test metrics"),
                                   (Answerer, "warm_up", "answers")):
            phases.starts(owner, attr, phase)
    before, start = peak_rss_mb(), time.perf_counter()
    stage.run_projection(kv["scout"], kv["main"], samples, models["scout"], models["main"], "bench", cfg, prompt,
                         "cpu", "float32", out)
    seconds = round(time.perf_counter() - start, 1)
    if not phases:
        return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}
    phases.mark("end")
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": max(phases.peaks.values()),
            "phase_peak_rss_mb": phases.peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--stages", nargs="+", choices=["selection", "projection"], default=["selection", "projection"])
    ap.add_argument("--out", type=Path, default=RECORDS / "stage_memory.json")
    args = ap.parse_args()
    config = load_config(["config.yaml"])
    selection = config["selection"] | {"max_samples": None}
    record: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs: dict = {stage: {"n": args.n} for stage in args.stages}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for factor in (1, 4):
            models, samples, kv = scaled_pair(root, args.n * factor, config)
            run, n = f"{factor}x", {"n_samples": args.n * factor}
            if "selection" in runs:
                runs["selection"][run] = in_child(_selection, models["scout"], models["main"], samples, selection,
                                                  config["prompt"], root / f"selection{factor}") | n
            if "projection" in runs:
                runs["projection"][run] = in_child(_projection, kv, models, samples, config["projection"],
                                                   config["prompt"], root / f"projection{factor}") | n
            print(run, {stage: r[run] for stage, r in runs.items()}, flush=True)
    for stage, r in runs.items():
        r["rss_ratio_4x_over_1x"] = round(r["4x"]["peak_rss_mb"] / r["1x"]["peak_rss_mb"], 3)
        if "phase_peak_rss_mb" in r["1x"]:
            one, four = r["1x"]["phase_peak_rss_mb"], r["4x"]["phase_peak_rss_mb"]
            r["phase_ratio_4x_over_1x"] = {phase: round(four[phase] / one[phase], 3) for phase in one}
        record[stage] = r
    write_record(args.out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

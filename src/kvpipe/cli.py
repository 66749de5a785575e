"""`kvpipe` command line: each stage of the workflow, runnable without Snakemake.

Every subcommand reads the same merged configuration the workflow uses (-c may be given
several times; later files override) and calls the same function as the workflow rule.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from kvpipe.errors import KvpipeError, one_line_errors


def _config(args: argparse.Namespace) -> dict:
    from kvpipe.config import load_config

    return load_config(args.config)


def _entry(config: dict, section: str, name: str) -> dict:
    """config[section][name], or a one-line error naming the option (--model, --dataset, --pair)."""
    if name not in config[section]:
        raise KvpipeError(f"--{section[:-1]}: {name!r} is not in {section} ({', '.join(sorted(config[section]))})")
    return config[section][name]


def _readable(path: Path, what: str) -> None:
    """One line naming path (and the option it came from, what) unless it is a readable file of its kind.

    ``.parquet`` files must carry Parquet's magic bytes at both ends, ``.json`` files must parse:
    whatever is read later then fails only on content the stage itself checks.
    """
    path = Path(path)
    if not path.exists():
        raise KvpipeError(f"{what}: {path}: not found")
    if not path.is_file():
        raise KvpipeError(f"{what}: {path}: is a directory, not a file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            if path.suffix == ".parquet":
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(size - 4, 0))
                if size < 12 or head != b"PAR1" or handle.read(4) != b"PAR1":
                    raise KvpipeError(f"{what}: {path}: not a Parquet file")
            elif path.suffix == ".json":
                handle.seek(0)
                json.loads(handle.read())
    except OSError as err:
        raise KvpipeError(f"{what}: {path}: not readable ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise KvpipeError(f"{what}: {path}: not valid JSON ({err})") from None


def _directory(path: Path, what: str, *names: str) -> None:
    """One line unless path is a readable directory holding the files names (each checked by _readable)."""
    path = Path(path)
    if not path.exists():
        raise KvpipeError(f"{what}: {path}: not found")
    if not path.is_dir():
        raise KvpipeError(f"{what}: {path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise KvpipeError(f"{what}: {path}: not readable (permission denied)")
    for name in names:
        _readable(path / name, what)


def _inputs(args: argparse.Namespace) -> None:
    """Check every file and directory a subcommand reads before any work starts (one line naming the option)."""
    for option in ("samples", "structure_metrics"):
        if getattr(args, option, None) is not None:
            _readable(args.__dict__[option], "--" + option.replace("_", "-"))
    for option in ("model_dir", "scout_dir", "main_dir"):
        if getattr(args, option, None) is not None:
            _directory(args.__dict__[option], "--" + option.replace("_", "-"), "kvpipe_model.json")
    if getattr(args, "logs", None) is not None:
        _directory(args.logs, "--logs")
    for option in ("scout_kv", "main_kv"):
        if getattr(args, option, None) is not None:
            _directory(args.__dict__[option], "--" + option.replace("_", "-"), "manifest.json")


def cmd_validate(args: argparse.Namespace) -> None:
    from kvpipe.config import run_models
    from kvpipe.shared_tokenizer import check_projection_tokenizers

    config = _config(args)
    check_projection_tokenizers(config)  # as the workflow does when it builds the DAG
    print(f"ok: {len(config['models'])} models, pairs {config['run']['pairs']}, datasets {config['run']['datasets']}; "
          f"models to materialise: {', '.join(run_models(config))}")


def cmd_materialize(args: argparse.Namespace) -> None:
    from kvpipe.models.materialize import materialize
    from kvpipe.shared_tokenizer import source_spec

    config = _config(args)
    # as the workflow rule: the card records the source, not the name the config gives its tokenizer
    card = materialize(args.model, source_spec(_entry(config, "models", args.model)), args.out)
    print(json.dumps(card, indent=2))


def cmd_sample(args: argparse.Namespace) -> None:
    from kvpipe.data.sampling import sample_to_file

    config = _config(args)
    frame = sample_to_file(args.dataset, _entry(config, "datasets", args.dataset), args.tokenizer, config["prompt"],
                           config["sampling"], args.out)
    print(f"wrote {len(frame)} samples to {args.out}")


def cmd_extract(args: argparse.Namespace) -> None:
    from kvpipe.kv.extract import extract

    config = _config(args)
    manifest = extract(args.model_dir, args.samples, args.out, config["extraction"], config["prompt"],
                       config["device"], args.dataset)
    print(f"{manifest['model']}: {manifest['rows_per_layer']} rows x {len(manifest['layers'])} layers, "
          f"{manifest['bytes'] / 1e6:.1f} MB in {args.out}")


REPORT_TABLES = {  # the tables each stage's report reads, in write_report's order (facts.json last)
    "structure": ("metrics.parquet", "facts.json"),
    "selection": ("answers.parquet", "overlap.parquet", "facts.json"),
    "projection": ("answers.parquet", "projector_metrics.parquet", "facts.json"),
}


VERDICT_STAGES = ("selection", "projection")   # the reports that word comparisons (the config's `verdicts` section)


def _report(stage: str, out: Path, dataset: str, config: dict) -> None:
    """Run a stage's report step on the tables (and timing files, where it has them) its compute step wrote to out."""
    out = Path(out)
    report = importlib.import_module(f"kvpipe.{stage}.report")
    timing = {name: out / name for name in getattr(report, "TIMING_FILES", ())}
    extra = [config["verdicts"]] if stage in VERDICT_STAGES else []
    report.write_report(*(out / name for name in REPORT_TABLES[stage]), *([timing] if timing else []), dataset, out,
                        *extra)
    from kvpipe.markdown_html import write_page

    for page in ("summary.md", "timing.md"):   # the HTML twins the workflow's report shows inline
        if (out / page).is_file():
            write_page(out / page)


def cmd_structure(args: argparse.Namespace) -> None:
    from kvpipe.config import pair_settings
    from kvpipe.structure.stage import run_structure

    config = _config(args)
    _entry(config, "pairs", args.pair)
    cfg = pair_settings(config, args.pair, "structure") | {"alignment": {"pool": config["alignment"]["pool"]}}
    run_structure(args.scout_kv, args.main_kv, args.samples, args.pair, cfg, args.out)
    _report("structure", args.out, args.dataset, config)
    print(f"wrote {args.out}/metrics.parquet, facts.json, summary.md, figures/")


def cmd_selection(args: argparse.Namespace) -> None:
    from kvpipe.config import pair_settings
    from kvpipe.selection.stage import run_selection

    config = _config(args)
    _entry(config, "pairs", args.pair)
    cfg = pair_settings(config, args.pair, "selection") | {"alignment": {"min_cover": config["alignment"]["min_cover"]}}
    run_selection(args.scout_dir, args.main_dir, args.samples, args.pair, cfg, config["prompt"], config["device"],
                  config["extraction"]["dtype"], args.out)
    _report("selection", args.out, args.dataset, config)
    print(f"wrote {args.out}/answers.parquet, summary.md, figures/")


def cmd_projection(args: argparse.Namespace) -> None:
    from kvpipe.config import pair_settings
    from kvpipe.projection.stage import run_projection

    config = _config(args)
    _entry(config, "pairs", args.pair)
    run_projection(args.scout_kv, args.main_kv, args.samples, args.scout_dir, args.main_dir, args.pair,
                   pair_settings(config, args.pair, "projection"), config["prompt"], config["device"],
                   config["extraction"]["dtype"], args.out, args.structure_metrics)
    _report("projection", args.out, args.dataset, config)
    print(f"wrote {args.out}/answers.parquet, projector_metrics.parquet, projectors/, summary.md, figures/")


def cmd_report(args: argparse.Namespace) -> None:
    report = importlib.import_module(f"kvpipe.{args.stage}.report")
    _directory(args.dir, "--dir", *REPORT_TABLES[args.stage], *getattr(report, "TIMING_FILES", ()))
    _report(args.stage, args.dir, args.dataset, _config(args))
    print(f"wrote {args.dir}/summary.md, figures/")


def cmd_progress(args: argparse.Namespace) -> None:
    import time

    from kvpipe.progress import recent_jobs

    while True:
        jobs = recent_jobs(args.logs, args.since * 60)
        stamp = time.strftime("%H:%M:%S")
        if not jobs:
            print(f"{stamp} no job log under {args.logs} written in the last {args.since:g} min", flush=True)
        else:
            print(f"{stamp} {len(jobs)} job log(s) written in the last {args.since:g} min, newest first:", flush=True)
            for job in jobs:
                print("  " + job.render(), flush=True)
        if not args.watch:
            return
        time.sleep(args.watch)


def parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per stage."""
    top = argparse.ArgumentParser(prog="kvpipe", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-c", "--config", action="append", type=Path, default=None,
                       help="config YAML (repeatable, later overrides earlier; default: config.yaml)")
        p.set_defaults(func=func)
        return p

    add("validate", cmd_validate, "Validate the configuration and list what the workflow would build.")
    p = add("materialize", cmd_materialize, "Turn a configured model source into a local safetensors directory.")
    p.add_argument("--model", required=True, help="model slug from the config")
    p.add_argument("--out", required=True, type=Path, help="output directory (e.g. results/models/SLUG)")
    p = add("sample", cmd_sample, "Sample a dataset deterministically into a Parquet table.")
    p.add_argument("--dataset", required=True, help="dataset name from the config")
    p.add_argument("--tokenizer", required=True,
                   help="materialised model directory or hub tokenizer id that counts sampling.max_context_tokens")
    p.add_argument("--out", required=True, type=Path, help="output Parquet file")
    p = add("extract", cmd_extract, "Extract one model's KV cache for a sample table into sharded Parquet.")
    p.add_argument("--model-dir", required=True, type=Path, help="materialised model directory")
    p.add_argument("--samples", required=True, type=Path, help="samples Parquet file")
    p.add_argument("--dataset", default="", help="dataset name recorded in the manifest")
    p.add_argument("--out", required=True, type=Path, help="output directory (e.g. results/kv/DATASET/MODEL)")
    p = add("structure", cmd_structure, "Analyse how a scout's keys and values predict a main model's (two KV datasets).")
    p.add_argument("--pair", required=True, help="pair name from the config")
    p.add_argument("--scout-kv", required=True, type=Path, help="KV dataset directory of the scout")
    p.add_argument("--main-kv", required=True, type=Path, help="KV dataset directory of the main model")
    p.add_argument("--samples", required=True, type=Path, help="samples Parquet file (passage ids for the split)")
    p.add_argument("--dataset", default="", help="dataset name for the report")
    p.add_argument("--out", required=True, type=Path, help="output directory (e.g. results/structure/DATASET/PAIR)")
    p = add("selection", cmd_selection, "Token selection by scout and main, overlap, and QA F1 from pruned caches.")
    p.add_argument("--pair", required=True, help="pair name from the config")
    p.add_argument("--scout-dir", required=True, type=Path, help="materialised scout model directory")
    p.add_argument("--main-dir", required=True, type=Path, help="materialised main model directory")
    p.add_argument("--samples", required=True, type=Path, help="samples Parquet file")
    p.add_argument("--dataset", default="", help="dataset name for the report")
    p.add_argument("--out", required=True, type=Path, help="output directory (e.g. results/selection/DATASET/PAIR)")
    p = add("projection", cmd_projection, "Fit scout->main KV projectors, inject them, answer; bytes and TTFT.")
    p.add_argument("--pair", required=True, help="pair name from the config")
    p.add_argument("--scout-kv", required=True, type=Path, help="KV dataset directory of the scout")
    p.add_argument("--main-kv", required=True, type=Path, help="KV dataset directory of the main model")
    p.add_argument("--scout-dir", required=True, type=Path, help="materialised scout model directory")
    p.add_argument("--main-dir", required=True, type=Path, help="materialised main model directory")
    p.add_argument("--samples", required=True, type=Path, help="samples Parquet file the KV datasets come from")
    p.add_argument("--structure-metrics", type=Path, default=None,
                   help="the structure stage's metrics.parquet (needed by projection.layer_map: best_cka)")
    p.add_argument("--dataset", default="", help="dataset name for the report")
    p.add_argument("--out", required=True, type=Path, help="output directory (e.g. results/projection/DATASET/PAIR)")
    p = add("report", cmd_report, "Rewrite a stage's figures and summary from the tables in its directory.")
    p.add_argument("stage", choices=list(REPORT_TABLES), help="which stage's report")
    p.add_argument("--dir", required=True, type=Path, help="the stage's output directory (its tables are read)")
    p.add_argument("--dataset", default="", help="dataset name for the report")
    p = add("progress", cmd_progress, "Show what running workflow jobs are doing: the last progress line of each "
            "recently written job log (tqdm bars and download lines go to the logs under Snakemake).")
    p.add_argument("--logs", type=Path, default=Path("results/logs"), help="the run's log directory (results/logs)")
    p.add_argument("--since", type=float, default=15, help="minutes: show logs written this recently (default 15)")
    p.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                   help="repeat every SECONDS until interrupted (default: once)")
    return top


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kvpipe` command."""
    args = parser().parse_args(argv)
    if args.config is None:
        args.config = [Path("config.yaml")]
    with one_line_errors():
        _inputs(args)
        args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])

"""`kvpipe` command line: each stage of the workflow, runnable without Snakemake.

Every subcommand reads the same merged configuration the workflow uses (-c may be given
several times; later files override) and calls the same function as the workflow rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvpipe.errors import KvpipeError, one_line_errors
from kvpipe.stages import SAMPLES, Input, Stage, stage, stages

MODEL_DIR = Input("model_dir", "materialised model directory", holds="kvpipe_model.json")


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
    for spec in args.inputs:
        path = getattr(args, spec.name)
        if path is None:
            continue
        option = "--" + spec.name.replace("_", "-")
        if spec.holds:
            _directory(path, option, spec.holds)
        else:
            _readable(path, option)
    if getattr(args, "logs", None) is not None:
        _directory(args.logs, "--logs")


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


def _report(stage: Stage, out: Path, dataset: str, config: dict) -> None:
    """Run a stage's report step on the tables (and timing files, where it has them) its compute step wrote to out."""
    from kvpipe.markdown_html import write_page

    stage.report(out, dataset, config["verdicts"])
    for page in ("summary.md", "timing.md"):   # the HTML twins the workflow's report shows inline
        if (Path(out) / page).is_file():
            write_page(Path(out) / page)


def cmd_stage(args: argparse.Namespace) -> None:
    """Run a stage's compute step and its report, as its rules do."""
    from kvpipe.config import stage_params

    config = _config(args)
    _entry(config, "pairs", args.pair)
    inputs = {spec.name: getattr(args, spec.name) for spec in args.declared.inputs}
    args.declared.compute(inputs, args.pair, stage_params(config, args.declared, args.pair), args.out)
    _report(args.declared, args.out, args.dataset, config)
    print(f"wrote {args.out}/{', '.join(args.declared.tables)}, summary.md, figures/")


def cmd_report(args: argparse.Namespace) -> None:
    chosen = stage(args.stage)
    _directory(args.dir, "--dir", *chosen.tables, *chosen.timing)
    _report(chosen, args.dir, args.dataset, _config(args))
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

    def add(name: str, func, help_: str, inputs: tuple[Input, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-c", "--config", action="append", type=Path, default=None,
                       help="config YAML (repeatable, later overrides earlier; default: config.yaml)")
        for spec in inputs:   # checked before any work starts (_inputs)
            p.add_argument("--" + spec.name.replace("_", "-"), required=spec.required, type=Path, default=None,
                           help=spec.help)
        p.set_defaults(func=func, inputs=inputs)
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
    p = add("extract", cmd_extract, "Extract one model's KV cache for a sample table into sharded Parquet.",
            (MODEL_DIR, SAMPLES))
    p.add_argument("--dataset", default="", help="dataset name recorded in the manifest")
    p.add_argument("--out", required=True, type=Path, help="output directory (e.g. results/kv/DATASET/MODEL)")
    for declared in stages():
        p = add(declared.name, cmd_stage, declared.help, declared.inputs)
        p.add_argument("--pair", required=True, help="pair name from the config")
        p.add_argument("--dataset", default="", help="dataset name for the report")
        p.add_argument("--out", required=True, type=Path,
                       help=f"output directory (e.g. results/{declared.name}/DATASET/PAIR)")
        p.set_defaults(declared=declared)
    p = add("report", cmd_report, "Rewrite a stage's figures and summary from the tables in its directory.")
    p.add_argument("stage", choices=[s.name for s in stages()], help="which stage's report")
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

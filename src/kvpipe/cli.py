"""`kvpipe` command line: each stage of the workflow, runnable without Snakemake.

Every subcommand reads the same merged configuration the workflow uses (-c may be given
several times; later files override) and calls the same function as the workflow rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvpipe.errors import KvpipeError, one_line_errors


def _config(args: argparse.Namespace) -> dict:
    from kvpipe.config import load_config

    return load_config(args.config)


def _model_spec(config: dict, slug: str) -> dict:
    if slug not in config["models"]:
        raise KvpipeError(f"--model: {slug!r} is not a configured model ({', '.join(sorted(config['models']))})")
    return config["models"][slug]


def cmd_validate(args: argparse.Namespace) -> None:
    from kvpipe.config import run_models

    config = _config(args)
    print(f"ok: {len(config['models'])} models, pairs {config['run']['pairs']}, datasets {config['run']['datasets']}; "
          f"models to materialise: {', '.join(run_models(config))}")


def cmd_materialize(args: argparse.Namespace) -> None:
    from kvpipe.models import materialize

    config = _config(args)
    card = materialize(args.model, _model_spec(config, args.model), args.out)
    print(json.dumps(card, indent=2))


def cmd_sample(args: argparse.Namespace) -> None:
    from kvpipe.sampling import sample_to_file

    config = _config(args)
    if args.dataset not in config["datasets"]:
        raise KvpipeError(f"--dataset: {args.dataset!r} is not a configured dataset")
    frame = sample_to_file(args.dataset, config["datasets"][args.dataset], args.tokenizer, config["prompt"],
                           config["sampling"], args.out)
    print(f"wrote {len(frame)} samples to {args.out}")


def cmd_extract(args: argparse.Namespace) -> None:
    from kvpipe.extract import extract

    config = _config(args)
    manifest = extract(args.model_dir, args.samples, args.out, config["extraction"], config["prompt"],
                       config["device"], args.dataset)
    print(f"{manifest['model']}: {manifest['rows_per_layer']} rows x {len(manifest['layers'])} layers, "
          f"{manifest['bytes'] / 1e6:.1f} MB in {args.out}")


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
    p.add_argument("--tokenizer", required=True, action="append", type=Path,
                   help="materialised model directory whose tokenizer bounds the prompt length (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="output Parquet file")
    p = add("extract", cmd_extract, "Extract one model's KV cache for a sample table into sharded Parquet.")
    p.add_argument("--model-dir", required=True, type=Path, help="materialised model directory")
    p.add_argument("--samples", required=True, type=Path, help="samples Parquet file")
    p.add_argument("--dataset", default="", help="dataset name recorded in the manifest")
    p.add_argument("--out", required=True, type=Path, help="output directory (e.g. results/kv/DATASET/MODEL)")
    return top


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kvpipe` command."""
    args = parser().parse_args(argv)
    if args.config is None:
        args.config = [Path("config.yaml")]
    with one_line_errors():
        args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])

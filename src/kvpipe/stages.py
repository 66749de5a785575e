"""The analysis stages, each declared once: ``STAGE = Stage(...)`` in its subpackage's ``__init__``.

A stage is found by walking kvpipe's subpackages, so adding one edits no central list. Its name
is that of its subpackage, its config section, its compute rule (``{name}``; its report rule is
``{name}_report``), its results directory (``results/{name}/{dataset}/{pair}/``) and its CLI
subcommand. Its modules follow two conventions: ``kvpipe.{name}.stage.compute(inputs, pair,
params, out_dir)`` writes its tables, and ``kvpipe.{name}.report`` holds ``FIGURES`` and
``write_report(*tables, [timing,] dataset, out_dir[, verdicts])``, which reads only those tables.
The workflow (``workflow/rules/common.smk``), the CLI and the config schema loop over
:func:`stages`; nothing here imports a stage's compute or report code until it is run.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from kvpipe.errors import KvpipeError


@dataclass(frozen=True)
class Input:
    """A file or directory a step reads: a rule input and a CLI option (``--name-with-dashes``) of that name."""

    name: str
    help: str
    holds: str | None = None  # a directory holding this file (the rule's input names the file); None: a file
    required: bool = True


SAMPLES = Input("samples", "samples Parquet file")
SCOUT_KV = Input("scout_kv", "KV dataset directory of the scout", holds="manifest.json")
MAIN_KV = Input("main_kv", "KV dataset directory of the main model", holds="manifest.json")
SCOUT_DIR = Input("scout_dir", "materialised scout model directory", holds="kvpipe_model.json")
MAIN_DIR = Input("main_dir", "materialised main model directory", holds="kvpipe_model.json")


@dataclass(frozen=True)
class Stage:
    """One analysis stage of a pair: what its compute step reads and writes, and what its report needs."""

    name: str
    help: str  # one line: the CLI subcommand's help
    order: int  # its place in every listing (CLI, run.stages' default, targets): the pipeline's reading order
    inputs: tuple[Input, ...]  # what its compute step reads, by rule input name
    tables: tuple[str, ...]  # the tables its compute step writes and its report reads, in write_report's order
    timing: tuple[str, ...] = ()  # measured seconds, apart so that every other output is byte-identical
    alignment: tuple[str, ...] = ()  # the `alignment` settings it reads, merged into its section's settings
    models: bool = False  # it runs the models: its params hold the prompt, device and compute dtype
    verdicts: bool = False  # its report words comparisons: write_report takes the config's `verdicts` section
    job_rules: tuple[str, ...] = ()  # its rules that run jobs (resources.threads keys); () = its compute rule alone

    @property
    def threaded_rules(self) -> tuple[str, ...]:
        """The rule names whose threads resources.threads may set: its job rules, else its compute rule."""
        return self.job_rules or (self.name,)

    @property
    def figures(self) -> tuple[str, ...]:
        """Its figures, named once beside their drawing functions (``kvpipe.{name}.report.FIGURES``)."""
        return tuple(importlib.import_module(f"kvpipe.{self.name}.report").FIGURES)

    def job_inputs(self, named: Any) -> dict[str, Path | None]:
        """Its inputs from a job's named input files (a directory for an Input that ``holds`` a file)."""
        paths = {spec.name: named.get(spec.name) for spec in self.inputs}
        return {
            spec.name: (Path(paths[spec.name]).parent if spec.holds else Path(paths[spec.name])) if paths[spec.name] else None
            for spec in self.inputs
        }

    def compute(self, inputs: Mapping[str, Path | None], pair: str, params: Mapping[str, Any], out_dir: Path) -> None:
        """Run its compute step: ``kvpipe.{name}.stage.compute``."""
        importlib.import_module(f"kvpipe.{self.name}.stage").compute(inputs, pair, params, Path(out_dir))

    def report(self, directory: Path, dataset: str, verdicts: Mapping[str, Any] | None = None) -> None:
        """Run its report on the tables (and timing files) in directory, writing there."""
        directory = Path(directory)
        timing = [{name: directory / name for name in self.timing}] if self.timing else []
        write_report = importlib.import_module(f"kvpipe.{self.name}.report").write_report
        write_report(
            *(directory / name for name in self.tables), *timing, dataset, directory, *([verdicts] if self.verdicts else [])
        )


@cache
def stages() -> tuple[Stage, ...]:
    """Every stage a kvpipe subpackage declares, in pipeline order."""
    import kvpipe

    found = []
    for module in pkgutil.iter_modules(kvpipe.__path__, "kvpipe."):
        declared = getattr(importlib.import_module(module.name), "STAGE", None) if module.ispkg else None
        if declared is None:
            continue
        if not isinstance(declared, Stage) or f"kvpipe.{declared.name}" != module.name:
            raise KvpipeError(f"{module.name}.STAGE: must be a kvpipe.stages.Stage named {module.name[7:]!r}")
        found.append(declared)
    return tuple(sorted(found, key=lambda s: (s.order, s.name)))


def stage(name: str) -> Stage:
    """The stage called name."""
    for declared in stages():
        if declared.name == name:
            return declared
    raise KvpipeError(f"{name!r} is not a stage ({', '.join(s.name for s in stages())})")

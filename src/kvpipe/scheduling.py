"""What a job asks the scheduler for: memory and runtime from the models' sizes, GPUs from the device.

Used by the workflow when it builds the DAG (``workflow/rules/common.smk``); never part of a
result, so changing it or the ``resources`` config section reruns nothing.

A model's size in billions of parameters is ``resources.models.<slug>.params_b`` when given,
else read from a size written in its hub id, file or directory name, or slug (``7B`` in
``Qwen/Qwen2.5-7B-Instruct``, ``0.5b`` in ``qwen2.5-coder-0.5b``, ``135M`` in
``SmolLM2-135M``), else unknown. A model of known size asks for
``resources.scale.<key>.base + resources.scale.<key>.per_b × size`` (``mem_mb``, ``runtime``);
one of unknown size for ``resources.default``. Explicit ``mem_mb`` / ``runtime`` in
``resources.models.<slug>`` win over both. A job holding several models (a pair rule) asks for
the sum of their memory and of their runtimes.

A job retried after a failure (Snakemake's ``--retries``, set by both profiles; an out-of-memory
kill is the usual cause on a cluster) asks for ``mem_mb × attempt``: twice the memory on its
first retry. Its runtime stays.

A chunk job (extraction, selection or projection answering over one chunk of samples) asks for
its models' runtime scaled by its samples over ``resources.runtime_samples`` (default 16, the
default ``run.chunk_size``), never less than the models' runtime: a run with larger chunks asks
for proportionally more time, so SLURM does not end a job that is merely long.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

JOB_KEYS = ("mem_mb", "runtime")

# A size such as 7B, 0.5b or 135M standing alone between separators: not the "2.5" of "Qwen2.5",
# nor the "7B" of "8x7B" (a mixture of experts is bigger than its expert).
_SIZE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")


def size_in_name(name: str) -> float | None:
    """Billions of parameters written in a model name (``Qwen2.5-7B-Instruct`` → 7.0), or None."""
    match = _SIZE.search(name)
    if match is None:
        return None
    value = float(match[1])
    return value / 1000 if match[2] in "Mm" else value


def model_size_b(config: dict[str, Any], slug: str) -> float | None:
    """A configured model's size in billions of parameters: explicit, read from its names, or None."""
    explicit = config["resources"]["models"].get(slug, {}).get("params_b")
    if explicit is not None:
        return float(explicit)
    spec = config["models"][slug]
    names = [spec.get("id"), PurePath(spec["path"]).name if spec.get("path") else None, slug]
    for name in filter(None, names):
        size = size_in_name(name)
        if size is not None:
            return size
    return None


def model_resources(config: dict[str, Any], slug: str) -> dict[str, int]:
    """``mem_mb`` (MB) and ``runtime`` (minutes) of a job holding one model."""
    section = config["resources"]
    size = model_size_b(config, slug)
    if size is None:
        res = {key: int(section["default"][key]) for key in JOB_KEYS}
    else:
        res = {key: round(section["scale"][key]["base"] + section["scale"][key]["per_b"] * size) for key in JOB_KEYS}
    own = section["models"].get(slug, {})
    res.update({key: int(own[key]) for key in JOB_KEYS if key in own})
    return res


def on_attempt(mem_mb: int, attempt: int = 1) -> int:
    """Memory of a job's ``attempt``-th try (Snakemake counts from 1): ``mem_mb`` on the first, then a multiple."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    return mem_mb * attempt


def job_resources(config: dict[str, Any], slugs: Iterable[str], attempt: int = 1,
                  samples: int | None = None) -> dict[str, int]:
    """``mem_mb`` and ``runtime`` of a job holding every model in slugs: the sums of each model's, the memory
    grown for a retry (``on_attempt``), the runtime of a chunk job over ``samples`` samples scaled from
    ``resources.runtime_samples`` (never below the models' own)."""
    per_model = [model_resources(config, slug) for slug in slugs]
    res = {key: sum(res[key] for res in per_model) for key in JOB_KEYS}
    res["mem_mb"] = on_attempt(res["mem_mb"], attempt)
    if samples is not None:
        res["runtime"] = math.ceil(res["runtime"] * max(1.0, samples / config["resources"]["runtime_samples"]))
    return res


def uses_cuda(device: str) -> bool:
    """Whether model jobs run on a GPU: ``device: cuda``, or ``auto`` where this machine has CUDA.

    ``auto`` is resolved as the job will resolve it (``kvpipe.models.load.resolve_device``), on
    the machine that builds the DAG: exact for a workstation; on a cluster set ``cuda`` or ``cpu``.
    """
    if device != "auto":
        return device == "cuda"
    import torch  # only here: building the DAG of an explicit device does not load torch

    return torch.cuda.is_available()

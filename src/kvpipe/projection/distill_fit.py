"""Training a projector on the `distill` objective: seeded, memory-bounded, early-stopped, resumable.

Each step accumulates the gradients of `accumulate` samples, one sample's graph at a time (so
memory is one sample's forward and backward through the main whatever the batch), then takes an
Adam step on the projector's parameters (post-RoPE key maps excepted). The samples of step s are
a pure function of (seed, s): epoch-wise seeded permutations of the training samples. Every
`eval_every` steps the held-out (validation-fold) KL and the answerable F1 of the main's greedy
answers from the projected cache are recorded in a learning curve; the best held-out KL's weights
are kept and training stops after `patience` evaluations without a gain, or after `steps`. With a
checkpoint path, the whole training state is saved every `checkpoint_every` steps (atomically) and a
fit started again resumes from it, ending with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import resource
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpipe.io import atomic_path, sha256_json
from kvpipe.models.load import LoadedModel
from kvpipe.projection.distill import DistillSample, answer_f1, distill_loss, frozen
from kvpipe.projection.projectors import Projector

TRAINED = "key_post"  # parameters whose name holds this are not trained (the post-RoPE comparison map)


def schedule(n: int, step: int, accumulate: int, seed: int) -> list[int]:
    """Indices of the training samples of a step (1-based): seeded permutations, epoch after epoch."""
    out = []
    for i in range((step - 1) * accumulate, step * accumulate):
        epoch, at = divmod(i, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[at]))
    return out


def peak_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocated high-water mark, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def evaluate(
    projector: Projector, held: Sequence[DistillSample], layer_map: list[int], main: LoadedModel, max_new_tokens: int
) -> dict[str, float]:
    """Held-out mean KL, and the mean answer F1 over answerable question samples (None if none)."""
    with torch.no_grad():
        kl = float(np.mean([float(distill_loss(projector, s, layer_map, main)) for s in held]))
    f1 = [answer_f1(projector, s, layer_map, main, max_new_tokens) for s in held if s.tokens is not None and s.answers]
    return {"validation_kl": kl, "answerable_f1": float(np.mean(f1)) if f1 else None}


def _state(projector: Projector, optimiser: torch.optim.Optimizer, step: int, log: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "projector": projector.state_dict(), "optimiser": optimiser.state_dict(), "log": log}


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path | None, key: str, projector: Projector, optimiser: torch.optim.Optimizer) -> tuple[int, dict]:
    """(step, log) from a checkpoint of the same fit, loading its weights and optimiser state; else a fresh start."""
    fresh = {"key": key, "best": None, "best_state": None, "waited": 0, "curve": [], "tokens": [0, 0], "train_kl": []}
    if path is None or not path.exists():
        return 0, fresh
    state = torch.load(path, map_location=projector.device, weights_only=False)
    if state["log"]["key"] != key:
        return 0, fresh
    projector.load_state_dict(state["projector"])
    optimiser.load_state_dict(state["optimiser"])
    return state["step"], state["log"]


def _step(
    projector: Projector,
    optimiser: torch.optim.Optimizer,
    batch: list[DistillSample],
    layer_map: list[int],
    main: LoadedModel,
    log: dict[str, Any],
) -> None:
    """One Adam step on the mean loss of the batch, accumulated one sample's graph at a time."""
    optimiser.zero_grad(set_to_none=True)
    total = 0.0
    for sample in batch:
        loss = distill_loss(projector, sample, layer_map, main) / len(batch)
        loss.backward()
        total += float(loss.detach())
        log["tokens"] = [a + b for a, b in zip(log["tokens"], sample.n_tokens, strict=True)]
    optimiser.step()
    log["train_kl"].append(total)


def fit_key(projector: Projector, train: Sequence[DistillSample], settings: dict[str, Any]) -> str:
    """Identifies a fit: its settings, the starting weights and the training targets (a checkpoint must match)."""
    start = {k: float(v.double().sum()) for k, v in projector.state_dict().items()}
    return sha256_json({"settings": settings, "start": start, "targets": [float(s.teacher.sum()) for s in train]})


def fit_distill(
    projector: Projector,
    train: Sequence[DistillSample],
    held: Sequence[DistillSample],
    layer_map: list[int],
    main: LoadedModel,
    settings: dict[str, Any],
    checkpoint: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train on the distill objective; keep the best held-out step. Returns the losses, curve and tokens seen."""
    torch.manual_seed(settings["seed"])
    key = fit_key(projector, train, settings)
    optimiser = torch.optim.Adam([p for n, p in projector.named_parameters() if TRAINED not in n], lr=settings["lr"])
    step, log = _resume(checkpoint, key, projector, optimiser)
    with frozen(main):
        if log["best"] is None:
            log["best"], log["best_state"] = _evaluated(projector, held, layer_map, main, settings, 0, log)
        while step < settings["steps"] and log["waited"] < settings["patience"]:
            step += 1
            batch = [train[i] for i in schedule(len(train), step, settings["accumulate"], settings["seed"])]
            _step(projector, optimiser, batch, layer_map, main, log)
            if step % settings["eval_every"] == 0 or step == settings["steps"]:
                _evaluated(projector, held, layer_map, main, settings, step, log)
            if checkpoint is not None and (step % settings["checkpoint_every"] == 0 or step == settings["steps"]):
                _save(checkpoint, _state(projector, optimiser, step, log))
            if on_step is not None:
                on_step(step)
        projector.load_state_dict(log["best_state"])
        train_kl = float(np.mean([float(distill_loss(projector, s, layer_map, main).detach()) for s in train]))
    return {
        "calibration": train_kl,
        "validation": log["best"],
        "steps": step,
        "learning_curve": log["curve"],
        "tokens_seen": {"context": log["tokens"][0], "target": log["tokens"][1]},
        "peak_mib": peak_mib(projector.device),
    }


def _evaluated(
    projector: Projector,
    held: Sequence[DistillSample],
    layer_map: list[int],
    main: LoadedModel,
    settings: dict[str, Any],
    step: int,
    log: dict[str, Any],
) -> tuple[float, dict]:
    """Evaluate, append to the curve and update the best weights or the patience count; returns (best, best state)."""
    scores = evaluate(projector, held, layer_map, main, settings["max_new_tokens"])
    recent = log["train_kl"][-settings["eval_every"] :]
    log["curve"].append(
        {"step": step, "train_kl": float(np.mean(recent)) if recent else None, **scores, "tokens_target": log["tokens"][1]}
    )
    if log["best"] is None or scores["validation_kl"] < log["best"]:
        log["best"], log["best_state"], log["waited"] = scores["validation_kl"], copy.deepcopy(projector.state_dict()), 0
    elif step:
        log["waited"] += 1
    return log["best"], log["best_state"]

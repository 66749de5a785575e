"""Training a projector on the `distill` objective: seeded, memory-bounded, early-stopped, resumable.

Each step accumulates the gradients of `accumulate` samples, one sample's graph at a time (so
memory is one sample's forward and backward through the main whatever the batch), then takes an
Adam step on the projector's parameters (post-RoPE key maps excepted). The samples of step s are
a pure function of (seed, s): epoch-wise seeded permutations of the training samples. Every
`eval_every` steps the held-out (validation-fold) loss and the answerable F1 of the main's greedy
answers from the projected cache are recorded in a learning curve; the best held-out loss's weights
are kept and training stops after `patience` evaluations without a gain, or after `steps`. With a
checkpoint path, the whole training state is saved every `checkpoint_every` steps (atomically) and a
fit started again resumes from it, ending with the same weights as an uninterrupted one. The loss is
distill's KL by default; any loss over samples of the same shape can be trained (the fuser's,
kvpipe.projection.fuser; the hidden map's, kvpipe.projection.hidden_distill).
"""

from __future__ import annotations

import copy
import resource
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpipe.io import atomic_path, sha256_json
from kvpipe.models.load import LoadedModel
from kvpipe.projection.distill import DistillSample, answer_f1, distill_loss, frozen
from kvpipe.settings import ProjectionSettings

Loss = Callable[[torch.nn.Module, DistillSample, list[int], LoadedModel], torch.Tensor]
F1 = Callable[[torch.nn.Module, DistillSample, list[int], LoadedModel, int], float]


@dataclass
class Student:
    """What is trained (a projector, or any module the loss reads) and how it is scored on a sample."""

    module: torch.nn.Module
    layer_map: list[int]
    main: LoadedModel
    loss: Loss = distill_loss
    f1: F1 = answer_f1

    def loss_of(self, sample: DistillSample) -> torch.Tensor:
        return self.loss(self.module, sample, self.layer_map, self.main)

    def answer_f1(self, sample: DistillSample, max_new_tokens: int) -> float:
        return self.f1(self.module, sample, self.layer_map, self.main, max_new_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


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


def evaluate(student: Student, held: Sequence[DistillSample], max_new_tokens: int) -> dict[str, float | None]:
    """Held-out mean loss, and the mean answer F1 over answerable question samples (None if none)."""
    with torch.no_grad():
        loss = float(np.mean([float(student.loss_of(s)) for s in held]))
    f1 = [student.answer_f1(s, max_new_tokens) for s in held if s.tokens is not None and s.answers]
    return {"validation_loss": loss, "answerable_f1": float(np.mean(f1)) if f1 else None}


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path | None, key: str, module: torch.nn.Module, optimiser: torch.optim.Optimizer) -> tuple[int, dict]:
    """(step, log) from a checkpoint of the same fit, loading its weights and optimiser state; else a fresh start."""
    fresh = {"key": key, "best": None, "best_state": None, "waited": 0, "curve": [], "tokens": [0, 0], "train_loss": []}
    if path is None or not path.exists():
        return 0, fresh
    state = torch.load(path, map_location=next(module.parameters()).device, weights_only=False)
    if state["log"]["key"] != key:
        return 0, fresh
    module.load_state_dict(state["projector"])
    optimiser.load_state_dict(state["optimiser"])
    return state["step"], state["log"]


def _step(student: Student, optimiser: torch.optim.Optimizer, batch: list[DistillSample], log: dict[str, Any]) -> None:
    """One Adam step on the mean loss of the batch, accumulated one sample's graph at a time."""
    optimiser.zero_grad(set_to_none=True)
    total = 0.0
    for sample in batch:
        loss = student.loss_of(sample) / len(batch)
        loss.backward()
        total += float(loss.detach())
        log["tokens"] = [a + b for a, b in zip(log["tokens"], sample.n_tokens, strict=True)]
    optimiser.step()
    log["train_loss"].append(total)


@dataclass(frozen=True)
class FitSchedule:
    """What a distill fit reads: the step schedule of `projection.distill`, the stage's seed and answer length."""

    steps: int
    accumulate: int
    lr: float
    eval_every: int
    patience: int
    checkpoint_every: int
    seed: int
    max_new_tokens: int

    @classmethod
    def of(cls, cfg: ProjectionSettings) -> FitSchedule:
        """The schedule of a projection stage's settings."""
        d = cfg.distill
        return cls(d.steps, d.accumulate, d.lr, d.eval_every, d.patience, d.checkpoint_every, cfg.seed, cfg.max_new_tokens)


def fit_key(module: torch.nn.Module, train: Sequence[DistillSample], schedule: FitSchedule) -> str:
    """Identifies a fit: its schedule, the starting weights and the training targets (a checkpoint must match)."""
    start = {k: float(v.double().sum()) for k, v in module.state_dict().items()}
    return sha256_json({"settings": asdict(schedule), "start": start, "targets": [s.key for s in train]})


def fit_distill(
    module: torch.nn.Module,
    train: Sequence[DistillSample],
    held: Sequence[DistillSample],
    layer_map: list[int],
    main: LoadedModel,
    settings: FitSchedule,
    checkpoint: Path | None = None,
    on_step: Callable[[int], None] | None = None,
    loss: Loss = distill_loss,
    f1: F1 = answer_f1,
) -> dict[str, Any]:
    """Train a projector (or the module `loss` and `f1` read) on the distill objective; keep the best held-out
    step. Returns the losses, the learning curve, the steps taken, the tokens seen and the peak memory."""
    torch.manual_seed(settings.seed)
    student = Student(module, layer_map, main, loss, f1)
    key = fit_key(module, train, settings)
    optimiser = torch.optim.Adam([p for n, p in module.named_parameters() if TRAINED not in n], lr=settings.lr)
    step, log = _resume(checkpoint, key, module, optimiser)
    with frozen(main):
        if log["best"] is None:
            _evaluated(student, held, settings, 0, log)
        while step < settings.steps and log["waited"] < settings.patience:
            step += 1
            _step(
                student, optimiser, [train[i] for i in schedule(len(train), step, settings.accumulate, settings.seed)], log
            )
            if step % settings.eval_every == 0 or step == settings.steps:
                _evaluated(student, held, settings, step, log)
            if checkpoint is not None and (step % settings.checkpoint_every == 0 or step == settings.steps):
                _save(
                    checkpoint, {"step": step, "projector": module.state_dict(), "optimiser": optimiser.state_dict(), "log": log}
                )
            if on_step is not None:
                on_step(step)
        module.load_state_dict(log["best_state"])
        train_loss = float(np.mean([float(student.loss_of(s).detach()) for s in train]))
    tokens = {"context": log["tokens"][0], "target": log["tokens"][1]}
    return {
        "calibration": train_loss,
        "validation": log["best"],
        "steps": step,
        "learning_curve": log["curve"],
        "tokens_seen": tokens,
        "peak_mib": peak_mib(student.device),
    }


def _evaluated(student: Student, held: Sequence[DistillSample], settings: FitSchedule, step: int, log: dict[str, Any]) -> None:
    """Evaluate, append to the learning curve and keep the best weights, or count an evaluation without a gain."""
    scores = evaluate(student, held, settings.max_new_tokens)
    recent = log["train_loss"][-settings.eval_every :]
    log["curve"].append(
        {"step": step, "train_loss": float(np.mean(recent)) if recent else None, **scores, "tokens_target": log["tokens"][1]}
    )
    if log["best"] is None or scores["validation_loss"] < log["best"]:
        log["best"], log["best_state"], log["waited"] = scores["validation_loss"], copy.deepcopy(student.module.state_dict()), 0
    elif step:
        log["waited"] += 1

"""The `fused` condition's fuser: a gated projector whose map and gates are trained on the main's next-token loss.

Cache-to-Cache's setting: the main prefills its own context cache and each context head is fused with
the projected scout cache, own + g_h (x W + b − own)_h; its own template rows stay as they are.
The fuser starts from the gated projector's `fused.objective` fit with every gate 0 (so it starts
at the main's own cache, main_full) and is trained with both models frozen on the cross-entropy
of the main's next tokens over a calibration prompt's gold reply (its first gold answer, or the
abstention reply when it has none), teacher-forced after the question and answer prompt. Unlike
distill's KL to the main's own distribution, whose minimum is reached by ignoring the scout, this
target rewards whatever the scout's cache adds. Training is kvpipe.projection.distill_fit's (its
settings, checkpoints, learning curve and early stopping on the validation fold); the samples are
those of distill's question prompts, calibration passages only.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvpipe.data.prompt import PromptTokens, build_prompt
from kvpipe.data.qa_metrics import UNANSWERABLE
from kvpipe.inference.cache_sources import ContextKV, OwnPrefill
from kvpipe.inference.decode import reply_end_id
from kvpipe.io import write_json
from kvpipe.models.load import LoadedModel
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.distill import kv_f1, log_probs_after, scout_payload
from kvpipe.projection.distill_fit import FitSchedule, fit_distill
from kvpipe.projection.distill_stage import calibration_rows, finished, settings_of
from kvpipe.projection.gated import GatedProjector, fuse_heads
from kvpipe.projection.inject import ScoutPayload, project
from kvpipe.projection.projectors import save_tensors
from kvpipe.settings import ProjectionSettings

OBJECTIVE = "next_token"  # the fused rows' objective column


@dataclass(frozen=True)
class FuseSample:
    """One calibration prompt: the scout's payload and the main's own cache of its prefix, the tokens after it
    (question, answer prompt, gold reply) and the reply tokens each position predicts (-100: not scored)."""

    payload: ScoutPayload
    own: ContextKV
    after: torch.Tensor  # [m]
    targets: torch.Tensor  # [m]: the next token at reply positions, -100 elsewhere
    tokens: PromptTokens
    answers: tuple[Any, ...]

    @property
    def prefix(self) -> int:
        return len(self.payload)

    @property
    def n_tokens(self) -> tuple[int, int]:
        """(prefix tokens the projector mapped, reply tokens the loss covers)."""
        return self.prefix, int((self.targets >= 0).sum())

    @property
    def key(self) -> float:
        return float(self.targets.sum())


def gold_reply(main: LoadedModel, answers: tuple[Any, ...]) -> list[int]:
    """Token ids of the reply the main should give: the first gold answer (or the abstention reply), then its end."""
    text = answers[0]["text"] if answers else UNANSWERABLE
    end = reply_end_id(main.tokenizer)
    end = main.tokenizer.eos_token_id if end is None else end
    return main.tokenizer(text, add_special_tokens=False)["input_ids"] + ([] if end is None else [int(end)])


def fuse_sample(scout: LoadedModel, main: LoadedModel, tokens: PromptTokens, answers: tuple[Any, ...]) -> FuseSample:
    """The sample of one question prompt with its gold reply."""
    question, reply = tokens.input_ids[tokens.context_end :], gold_reply(main, answers)
    after = torch.as_tensor(np.concatenate([question, reply[:-1]]), dtype=torch.long)
    targets = torch.full((len(after),), -100, dtype=torch.long)
    targets[len(question) - 1 :] = torch.as_tensor(reply)
    own = OwnPrefill(1).context_kv(main, tokens)
    own = ContextKV([k.detach().cpu() for k in own.keys], [v.detach().cpu() for v in own.values], own.positions.cpu())
    return FuseSample(scout_payload(scout, tokens), own, after, targets, tokens, answers)


def fuse(
    fuser: GatedProjector, payload: ScoutPayload, own: ContextKV, layer_map: list[int], main: LoadedModel, start: int
) -> ContextKV:
    """The main's own cache with rows start.. of each head fused with the ungated projection by the fuser's gates."""

    def fused(own_t: torch.Tensor, given: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        own_t = own_t.to(main.device).float()
        return torch.cat([own_t[:, :start], fuse_heads(own_t[:, start:], given[:, start:], gate)], dim=1)

    with fuser.ungated():
        given = project(fuser, payload, layer_map, main)
    keys = [fused(o, g, fuser.gate["key"][j]) for j, (o, g) in enumerate(zip(own.keys, given.keys, strict=True))]
    values = [fused(o, g, fuser.gate["value"][j]) for j, (o, g) in enumerate(zip(own.values, given.values, strict=True))]
    return ContextKV(keys, values, given.positions)


def _fused(fuser: GatedProjector, sample: FuseSample, layer_map: list[int], main: LoadedModel) -> ContextKV:
    return fuse(fuser, sample.payload, sample.own, layer_map, main, sample.tokens.context_start)


def fuse_loss(fuser: GatedProjector, sample: FuseSample, layer_map: list[int], main: LoadedModel) -> torch.Tensor:
    """Mean cross-entropy of the gold reply's tokens, the main reading the fused cache."""
    logp = log_probs_after(_fused(fuser, sample, layer_map, main), sample.after, main)
    scored = sample.targets >= 0
    return -logp[scored.to(logp.device)].gather(1, sample.targets[scored].to(logp.device)[:, None]).mean()


def fuse_f1(fuser: GatedProjector, sample: FuseSample, layer_map: list[int], main: LoadedModel, max_new_tokens: int) -> float:
    """F1 of the main's greedy answer from the fused cache."""
    with torch.no_grad():
        return kv_f1(_fused(fuser, sample, layer_map, main), sample, main, max_new_tokens)


def fuser_start(gated: GatedProjector) -> GatedProjector:
    """A copy of a gated fit with every gate 0: fused, it is the main's own cache."""
    fuser = copy.deepcopy(gated)
    with torch.no_grad():
        for g in fuser.gate.values():
            g.zero_()
    return fuser


def stage_fuser(
    cal: Calibration,
    table: pd.DataFrame,
    models: tuple[LoadedModel, LoadedModel],
    prompt: dict[str, Any],
    cfg: ProjectionSettings,
    projectors: dict[tuple[str, str], Any],
    about: dict[str, Any],
    out_dir: Path,
) -> tuple[GatedProjector, dict[str, float]]:
    """Train the fuser from the gated fit, save it as projectors/fuser-next_token, and return it (on the main's
    device) with its fit time and peak memory (for the timing files)."""
    scout, main = models
    started = time.perf_counter()

    def samples(rows: pd.DataFrame) -> list[FuseSample]:
        out = []
        for row in rows.itertuples(index=False):
            answers = () if row.is_impossible else tuple(row.answers)
            out.append(fuse_sample(scout, main, build_prompt(main.tokenizer, prompt, row.context, row.question), answers))
        return out

    train, held = (samples(rows) for rows in calibration_rows(cal, table, cfg))
    fuser = fuser_start(projectors[("gated", cfg.fused.objective)]).to(main.device)
    checkpoint = out_dir / "checkpoints" / "fuser.pt"
    result = fit_distill(fuser, train, held, cal.layer_map, main, FitSchedule.of(cfg), checkpoint, loss=fuse_loss, f1=fuse_f1)
    finished(checkpoint)
    fields = {k: result[k] for k in ("calibration", "validation", "steps", "learning_curve", "tokens_seen")}
    card = about | {
        "projector": "gated",
        "objective": OBJECTIVE,
        "start": f"gated/{cfg.fused.objective}",
        "errors": {OBJECTIVE: fields | {"train_samples": len(train), "held_out_samples": len(held)}},
        "settings": settings_of(cfg),
        "params": fuser.n_params(),
        "bytes": fuser.n_bytes(),
    }
    base = Path(out_dir) / "projectors" / f"fuser-{OBJECTIVE}"
    save_tensors(fuser.state_dict(), base.with_suffix(".safetensors"))
    write_json(base.with_suffix(".json"), card)
    return fuser.eval(), {"fit_s": time.perf_counter() - started, "peak_mib": result["peak_mib"]}

"""The attention-output objective: refine a projector so the main model's attention over the projected
cache matches its attention over its own cache.

For calibration samples, the main model's question-part queries (RoPE applied) are captured from
a forward pass over the whole prompt, with its own context keys and values; the scout's payload
comes from its own prefill. Per main layer j the target is O = softmax(s q Kᵀ) V over the given
cache, s being the layer's own attention scale (1/√d, or Gemma's query_pre_attn_scalar^-½), the
prediction Ô the same over the projected K̂, V̂; the loss is Σ‖Ô − O‖² / Σ‖O − Ō‖², averaged over
layers. Layer-local: no gradient flows through the model. The projector's key and
value maps are trained jointly with Adam from their reconstruction fit; the loss on held-out
calibration samples is checked every `eval_every` steps and the best step's weights are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvpipe.data.prompt import PromptTokens
from kvpipe.inference.cache_sources import OwnPrefill
from kvpipe.inference.capture import capture_queries, rope_queries
from kvpipe.kv.checks import cache_layer
from kvpipe.models.load import LoadedModel
from kvpipe.projection.inject import ScoutPayload, project
from kvpipe.projection.projectors import Projector
from kvpipe.settings import AttentionSettings


@dataclass(frozen=True)
class AttentionSample:
    """One calibration prompt: the scout's payload, the main's question queries and own context KV."""

    payload: ScoutPayload
    queries: list[torch.Tensor]   # per main layer [Hq, nq, d], RoPE applied
    keys: list[torch.Tensor]      # per main layer [Hkv, n, d], post-RoPE
    values: list[torch.Tensor]


@torch.no_grad()
def collect(scout: LoadedModel, main: LoadedModel, tokens: PromptTokens) -> AttentionSample:
    """The attention sample of one prompt (both models run on it once)."""
    payload = ScoutPayload.from_context(scout, OwnPrefill(1).context_kv(scout, tokens))
    ids = torch.as_tensor(tokens.input_ids, device=main.device)[None]
    end = tokens.context_end
    with capture_queries(main) as raw:
        cache = main.model(input_ids=ids, use_cache=True, logits_to_keep=1, past_key_values=DynamicCache()).past_key_values
    positions = torch.arange(end, len(tokens), device=main.device)
    layers = [cache_layer(cache, j) for j in range(len(cache.layers))]
    return AttentionSample(payload, [rope_queries(main, r[0, end:], positions, j).float() for j, r in enumerate(raw)],
                           [k[0, :, :end].float() for k, _ in layers], [v[0, :, :end].float() for _, v in layers])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention of queries [Hq, nq, d] over a cache [Hkv, n, d] (every entry visible), scores times `scale`."""
    hkv, _, d = k.shape
    qg = q.reshape(hkv, -1, q.shape[1], d)
    weights = torch.softmax(torch.einsum("gqnd,gtd->gqnt", qg, k) * scale, dim=-1)
    return torch.einsum("gqnt,gtd->gqnd", weights, v).reshape(q.shape[0], q.shape[1], -1)


def attention_loss(projector: Projector, sample: AttentionSample, layer_map: list[int], main: LoadedModel) -> torch.Tensor:
    """Mean over layers of Σ‖Ô − O‖² / Σ‖O − Ō‖² for one sample."""
    given = project(projector, sample.payload, layer_map, main)
    losses = []
    for j, q in enumerate(sample.queries):
        scale = main.model.model.layers[j].self_attn.scaling
        target = attend(q, sample.keys[j], sample.values[j], scale)
        pred = attend(q, given.keys[j], given.values[j], scale)
        losses.append(((pred - target) ** 2).sum() / ((target - target.mean((0, 1))) ** 2).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def _mean_loss(projector: Projector, samples: Sequence[AttentionSample], layer_map: list[int],
               main: LoadedModel) -> torch.Tensor:
    return torch.stack([attention_loss(projector, s, layer_map, main) for s in samples]).mean()


def fine_tune(projector: Projector, train: Sequence[AttentionSample], held: Sequence[AttentionSample],
              layer_map: list[int], main: LoadedModel, settings: AttentionSettings, seed: int) -> dict[str, float]:
    """Train the key and value maps on the attention loss; keep the best held-out step. Returns both losses."""
    torch.manual_seed(seed)
    params = [p for name, p in projector.named_parameters() if "key_post" not in name]
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    with torch.no_grad():
        best = float(_mean_loss(projector, held, layer_map, main))
    best_state = copy.deepcopy(projector.state_dict())
    for step in range(1, settings.steps + 1):
        optimiser.zero_grad(set_to_none=True)
        _mean_loss(projector, train, layer_map, main).backward()
        optimiser.step()
        if step % settings.eval_every == 0 or step == settings.steps:
            with torch.no_grad():
                loss = float(_mean_loss(projector, held, layer_map, main))
            if loss < best:
                best, best_state = loss, copy.deepcopy(projector.state_dict())
    projector.load_state_dict(best_state)
    with torch.no_grad():
        return {"calibration": float(_mean_loss(projector, train, layer_map, main)), "validation": best}

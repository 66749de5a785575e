"""Per-model KV-cache extraction of a sample table into the sharded Parquet KV dataset.

For each sample the chat prompt is run through the model once (use_cache=True); the cache
holds post-RoPE keys and values of every token in every layer. Pre-RoPE keys are obtained
by the exact inverse rotation with each layer's own RoPE tables (Gemma 3's sliding-window
layers rotate with another base than its full-attention layers). Every logit and cache
tensor is checked for non-finite values (the FP16 overflow trap), and so is the cast to the
storage dtype.

Shards are written atomically and recorded in a progress file; a rerun with the same
inputs verifies and skips finished shards. Memory is bounded by one shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import DynamicCache

from kvpipe.data.prompt import PromptTokens, build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.io import sha256_file, write_json
from kvpipe.kv import store as kvstore
from kvpipe.kv.checks import cache_layer, check_cache, check_finite, check_window
from kvpipe.models.load import LoadedModel, load_model
from kvpipe.models.rope import invert_rope, layer_rope_tables
from kvpipe.provenance import module_hash


def resolve_layers(layers: Any, num_layers: int, slug: str) -> list[int]:
    """The configured layer list ('all' or indices), checked against the model's depth."""
    if layers == "all":
        return list(range(num_layers))
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise KvpipeError(f"extraction.layers: {bad} out of range for model {slug} with {num_layers} layers")
    return sorted(layers)


def forward(lm: LoadedModel, input_ids: np.ndarray) -> Any:
    """One prefill with cache; the cache, then the logits, must be finite.

    A config-less DynamicCache keeps every token in every layer: a model's default cache keeps only
    the last sliding_window - 1 tokens of sliding-window layers (Gemma 3). Attention is the same.
    """
    ids = torch.as_tensor(input_ids, device=lm.device).unsqueeze(0)
    with torch.inference_mode():
        out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, past_key_values=DynamicCache())
    check_cache(out.past_key_values, lm)
    check_finite(out.logits, "the logits", lm)
    return out.past_key_values


def _to_rows(x: torch.Tensor, storage: np.dtype, what: str, lm: LoadedModel) -> np.ndarray:
    """[1, H, T, D] tensor -> [T, H*D] array in the storage dtype, refusing overflow."""
    arr = x[0].transpose(0, 1).reshape(x.shape[2], -1).float().cpu().numpy()
    with np.errstate(over="ignore"):
        out = arr.astype(storage)
    if not np.isfinite(out).all():
        raise KvpipeError(f"model {lm.slug}: {what} exceeds the range of storage dtype {storage.name} "
                          f"(max |x| = {np.abs(arr).max():.3g}); set extraction.storage_dtype: float32")
    return out


def extract_sample(lm: LoadedModel, tokens: Any, layers: list[int], tables: list[tuple[torch.Tensor, torch.Tensor]],
                   storage: np.dtype) -> dict[int, dict[str, np.ndarray]]:
    """KV rows of one prompt for each requested layer: {layer: {kind: [T, H*D]}} (tables: RoPE tables per layer)."""
    cache = forward(lm, tokens.input_ids)
    n = len(tokens)
    rows = {}
    for layer in layers:
        keys, values = cache_layer(cache, layer)
        cos, sin = tables[layer]
        pre = invert_rope(keys.float(), cos[:n], sin[:n])
        rows[layer] = {"key": _to_rows(keys, storage, f"keys of layer {layer}", lm),
                       "key_pre_rope": _to_rows(pre, storage, f"pre-RoPE keys of layer {layer}", lm),
                       "value": _to_rows(values, storage, f"values of layer {layer}", lm)}
    return rows


@dataclass(frozen=True)
class _Job:
    """What every shard of one model's extraction needs."""

    lm: LoadedModel
    root: Path
    layers: list[int]
    storage: np.dtype
    compression: str
    schema: Any
    tables: list[tuple[torch.Tensor, torch.Tensor]]


def _prompts(lm: LoadedModel, samples: pd.DataFrame, prompt: dict[str, Any]) -> list[PromptTokens]:
    """Every sample's prompt for this model's tokenizer, each checked against its context window."""
    prompts = []
    for row in samples.itertuples(index=False):
        tokens = build_prompt(lm.tokenizer, prompt, row.context, row.question)
        check_window(lm, len(tokens), row.id)
        prompts.append(tokens)
    return prompts


def _extract_shard(job: _Job, index: int, chunk: pd.DataFrame, prompts: list[PromptTokens], bar: Any) -> dict[str, Any]:
    """Run the samples of one shard, write one file per layer; return the shard's progress record."""
    meta: dict[str, list[np.ndarray]] = {k: [] for k in ("sample_idx", "sample_id", "position", "segment",
                                                         "token_id", "char_start", "char_end")}
    vectors: dict[int, dict[str, list[np.ndarray]]] = {l: {k: [] for k in kvstore.KINDS} for l in job.layers}
    for row, tokens in zip(chunk.itertuples(index=False), prompts, strict=True):
        n = len(tokens)
        meta["sample_idx"].append(np.full(n, row.sample_idx, np.int32))
        meta["sample_id"].append(np.full(n, row.id, object))
        meta["position"].append(np.arange(n, dtype=np.int32))
        meta["segment"].append(tokens.segment)
        meta["token_id"].append(tokens.input_ids.astype(np.int32))
        meta["char_start"].append(tokens.char_start)
        meta["char_end"].append(tokens.char_end)
        for layer, kinds in extract_sample(job.lm, tokens, job.layers, job.tables, job.storage).items():
            for kind, arr in kinds.items():
                vectors[layer][kind].append(arr)
        bar.update(1)
    flat = {k: np.concatenate(v) for k, v in meta.items()}
    files = {}
    for layer in job.layers:
        table = kvstore.build_table(flat, {k: np.concatenate(v) for k, v in vectors[layer].items()}, job.schema)
        rel = kvstore.shard_file(layer, index)
        files[rel] = kvstore.write_table(table, job.root / rel, job.compression)
    first = int(chunk["sample_idx"].iloc[0])
    return {"index": index, "samples": [first, first + len(chunk)], "rows": len(flat["position"]), "files": files}


def extract(model_dir: Path, samples_path: Path, out_dir: Path, extraction: dict[str, Any],
            prompt: dict[str, Any], device: str = "auto", dataset: str = "") -> dict[str, Any]:
    """Extract the KV cache of every sample into out_dir; return the manifest."""
    root = Path(out_dir)
    lm = load_model(model_dir, device, extraction["dtype"])
    samples = pd.read_parquet(samples_path)
    prompts = _prompts(lm, samples, prompt)
    cfg = lm.model.config
    width = lm.card["num_kv_heads"] * lm.card["head_dim"]
    job = _Job(lm, root, resolve_layers(extraction["layers"], cfg.num_hidden_layers, lm.slug),
               np.dtype(extraction["storage_dtype"]), extraction["compression"],
               kvstore.schema(width, extraction["storage_dtype"]),
               layer_rope_tables(lm.model, torch.arange(max(map(len, prompts)), device=lm.device)))
    key = {"format": kvstore.FORMAT, "model_fingerprint": lm.card["fingerprint"],
           "samples_sha256": sha256_file(samples_path), "extraction": extraction, "prompt": prompt,
           "device": lm.device.type, "compute_dtype": str(lm.dtype).removeprefix("torch."),
           "code": module_hash("kvpipe.kv.extract")}
    done = kvstore.verified_shards(root, key)
    kvstore.remove_stale(root, {rel for shard in done.values() for rel in shard["files"]})
    size = extraction["shard_size"]
    started = time.perf_counter()
    with tqdm(total=len(samples), desc=f"extract {lm.slug}", unit="sample", mininterval=5) as bar:
        for s in range((len(samples) + size - 1) // size):
            rows = slice(s * size, (s + 1) * size)
            if s in done:
                bar.update(len(samples.iloc[rows]))
                continue
            done[s] = _extract_shard(job, s, samples.iloc[rows], prompts[rows], bar)
            kvstore.write_progress(root, key, done)
    manifest = {
        "format": kvstore.FORMAT, "key": key, "dataset": dataset, "model": lm.slug,
        "architecture": lm.card["architecture"], "num_layers": cfg.num_hidden_layers, "layers": job.layers,
        "num_kv_heads": lm.card["num_kv_heads"], "head_dim": lm.card["head_dim"], "width": width,
        "storage_dtype": extraction["storage_dtype"], "n_samples": len(samples),
        "rows_per_layer": sum(s["rows"] for s in done.values()),
        "bytes": sum((root / rel).stat().st_size for s in done.values() for rel in s["files"]),
        "shards": [done[i] for i in sorted(done)],
    }
    # measured seconds stay out of the manifest, which is byte-identical between runs
    write_json(root / kvstore.TIMINGS, {"seconds_this_run": round(time.perf_counter() - started, 3)})
    kvstore.finish(root, manifest)
    return manifest

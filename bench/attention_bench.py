"""One greedy decoding step of a masked batch of pruned caches on CPU: transformers' sdpa against kvpipe_sdpa.

kvpipe answers the conditions of a prompt as one batch whose rows keep different numbers of cache
entries, so every step carries a key mask; transformers' `sdpa` then copies each key/value head
once per query head it serves, while `kvpipe.models.gqa_attention.folded_sdpa` folds the query
heads instead. Loads the default scout (Qwen2.5-Coder-0.5B, the kvpress race's model), fills a cache
of 3 rows keeping 25 / 50 / 75 % of a prompt's entries (seeded random keys and values: a step's
cost does not depend on them) for a SQuAD-length and a long-context prompt, and times decoding
steps with each attention function, same process, alternating. Checks that both decode the same
greedy tokens. Writes bench/results/attention.json.

    python bench/attention_bench.py [--model results/models/qwen2.5-coder-0.5b] [--lengths 330 4363] [--steps 8]
"""

from __future__ import annotations

import argparse
import platform
from functools import partial
from pathlib import Path

import torch
from benchkit import RECORDS, greedy_steps, stock_against_kvpipe, write_record
from transformers import DynamicCache, PreTrainedModel

from kvpipe import layout
from kvpipe.models.gqa_attention import NAME as FOLDED
from kvpipe.models.load import load_model

IMPLEMENTATIONS = {"stock": "sdpa", "kvpipe": FOLDED}


def _batch(model: PreTrainedModel, kept: list[int], seed: int) -> tuple[DynamicCache, torch.Tensor]:
    """A padded cache whose row r holds kept[r] seeded entries, and its key mask [rows, longest]."""
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (len(kept), cfg.num_key_value_heads, max(kept), dim)
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), layer)
    mask = torch.zeros(len(kept), max(kept), dtype=torch.long)
    for r, n in enumerate(kept):
        mask[r, :n] = 1
    return cache, mask


def _steps(model: PreTrainedModel, kept: list[int], steps: int) -> tuple[list[float], list[list[int]]]:
    """Seconds of each greedy step after the first, and the tokens of every step."""
    cache, mask = _batch(model, kept, seed=len(kept) * max(kept))
    position = torch.as_tensor(kept)[:, None]

    def inputs(step: int) -> dict:
        grown = torch.cat([mask, mask.new_ones(len(kept), step + 1)], dim=1)   # the kept entries and every fed token
        return {"attention_mask": grown, "position_ids": position + step, "past_key_values": cache}

    _, first = greedy_steps(model, torch.full((len(kept), 1), 13), 1, inputs)   # a warm-up step, not timed
    seconds, tokens = greedy_steps(model, torch.as_tensor(first[0])[:, None], steps, lambda step: inputs(step + 1))
    return seconds, first + tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=layout.model_dir("qwen2.5-coder-0.5b"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[330, 4363], help="prompt entries before pruning")
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RECORDS / "attention.json")
    args = ap.parse_args()
    lm = load_model(args.model, "cpu", "float32")
    cfg = lm.model.config
    record = {"model": args.model.name, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "query_heads_per_kv_head": cfg.num_attention_heads // cfg.num_key_value_heads,
              "retentions": args.retentions, "steps": args.steps, "lengths": {}}
    with torch.inference_mode():
        setups = {name: partial(lm.model.set_attn_implementation, impl) for name, impl in IMPLEMENTATIONS.items()}
        for length in args.lengths:
            kept = [max(1, round(r * length)) for r in args.retentions]
            record["lengths"][length] = {"kept": kept} | stock_against_kvpipe(setups, partial(_steps, lm.model, kept, args.steps))
            print(length, record["lengths"][length], flush=True)
    lm.model.set_attn_implementation(FOLDED)
    write_record(args.out, record)
    print(args.out.read_text())


if __name__ == "__main__":
    main()

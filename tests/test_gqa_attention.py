"""kvpipe_sdpa: grouped-query attention under a mask without a per-head copy of the cache, against transformers' sdpa."""

import numpy as np
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpipe.data.prompt import build_prompt
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.models.gqa_attention import NAME, folded_sdpa


class _Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("queries, mask_rows", [(1, 1), (5, 5), (5, 1)], ids=["one query", "causal", "broadcast"])
def test_folded_attention_equals_the_stock_path_under_a_mask(queries, mask_rows):
    """Per-query masks and a mask of one row broadcast over every query (a caller's own 4D mask may be either)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, queries, 8, generator=g)
    k, v = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    mask = torch.ones(2, 1, mask_rows, 12, dtype=torch.bool).tril(12 - mask_rows)   # causal over the last rows' keys
    mask[1, :, :, 3:7] = False                                                      # row 1: padding between its entries
    module = _Attention().eval()
    ours, _ = folded_sdpa(module, q, k, v, mask, scaling=0.3)
    stock, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert ours.shape == stock.shape == (2, queries, 6, 8)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


def test_models_answer_masked_batches_with_it_and_as_with_stock_sdpa(tiny_main, samples, smoke_config):
    """A batch of unequal rows (a mask) gives the same tokens through kvpipe_sdpa as through transformers' sdpa."""
    assert tiny_main.model.config._attn_implementation == NAME
    row = samples.iloc[0]
    tokens = build_prompt(tiny_main.tokenizer, smoke_config["prompt"], row["context"], row["question"])
    n = tokens.context_end - tokens.context_start
    rows = [AnswerRequest(f"row {i}", np.arange(0, n, step)) for i, step in enumerate((1, 2, 3))]
    ours = [a.token_ids for a in Session(tiny_main, tokens, 8).answer(rows, 8)]
    try:
        tiny_main.model.set_attn_implementation("sdpa")
        stock = [a.token_ids for a in Session(tiny_main, tokens, 8).answer(rows, 8)]
    finally:
        tiny_main.model.set_attn_implementation(NAME)
    assert ours == stock and all(ours)

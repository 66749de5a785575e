"""kvpipe.models.cpu_linear: the few-row path computes what nn.Linear computes, and CPU models get it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvpipe.models.cpu_linear import ROWS, few_row_linears
from kvpipe.models.load import load_model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, ROWS, ROWS + 1, 40])
def test_few_row_linear_equals_the_stock_product(rows, bias):
    torch.manual_seed(rows)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(rows, 1, 48)
    want = F.linear(x, layer.weight, layer.bias)
    few_row_linears(layer)
    got = layer(x)
    assert got.shape == want.shape == (rows, 1, 80)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    half = torch.randn(rows, 48, dtype=torch.bfloat16)   # other dtypes keep the stock kernel
    torch.testing.assert_close(layer.to(torch.bfloat16)(half), F.linear(half, layer.weight, layer.bias))


def test_cpu_models_use_the_few_row_path_and_answer_the_same(model_dirs):
    lm = load_model(model_dirs["tiny-main"], "cpu", "float32")
    linears = [m for m in lm.model.modules() if type(m) is nn.Linear]
    assert linears and all("forward" in vars(m) for m in linears)
    ids = torch.arange(5, 25)[None].expand(3, -1)
    with torch.inference_mode():
        patched = lm.model(input_ids=ids[:, -1:]).logits
        for m in linears:
            del m.forward   # back to nn.Linear.forward
        stock = lm.model(input_ids=ids[:, -1:]).logits
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-5)

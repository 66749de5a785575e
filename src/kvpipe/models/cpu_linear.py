"""Few-row products of linear layers on CPU, computed with the weight on the left.

PyTorch computes `nn.Linear` on CPU as x @ W.T (MKL sgemm). For the few rows of batched
decoding (one new token for each of a handful of conditions) that kernel is several times slower
than W @ x.T, and from 8 rows on it is the faster one again (bench/results/decode.json: a decoding
step of the 0.5B model for 3 conditions cost as much as 3 steps of one). `few_row_linears` makes
every float32 `nn.Linear` of a CPU model take W @ x.T for 2 to `ROWS` rows and the stock kernel
otherwise (one row: both take the same time). The sums are the same, in another order.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

ROWS = 7   # measured: faster for 2 to 7 rows, slower from 8 (bench/decode_bench.py)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // self.in_features
    if not 2 <= rows <= ROWS or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, self.weight, self.bias)
    y = torch.mm(self.weight, x.reshape(rows, self.in_features).t()).t().reshape(*x.shape[:-1], self.out_features)
    return y if self.bias is None else y + self.bias


def few_row_linears(model: nn.Module) -> nn.Module:
    """Every plain nn.Linear of model computes float32 CPU products of 2 to ROWS rows as W @ x.T (in place; returns model)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_forward, module)
    return model

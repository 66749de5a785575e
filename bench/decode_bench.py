"""One greedy decoding step of a batch of conditions on CPU: stock linear layers against kvpipe's few-row path.

Loads the default scout (Qwen2.5-Coder-0.5B), prefills a 225-token prompt (a SQuAD prompt's
length) for 1 to 13 rows (one condition each) and times decoding steps with the stock
`nn.Linear` (x @ W.T) and with `kvpipe.models.cpu_linear.few_row_linears` (W @ x.T for 2 to 7 rows),
same process, alternating; also the output layer alone. Checks that both give the same greedy
tokens. Writes bench/results/decode.json.

    python bench/decode_bench.py [--model results/models/qwen2.5-coder-0.5b] [--steps 8]
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit import RECORDS, greedy_steps, stock_against_kvpipe, write_record
from torch import nn
from transformers import DynamicCache

from kvpipe import layout
from kvpipe.models.cpu_linear import few_row_linears
from kvpipe.models.load import load_model


def _stock(model: nn.Module) -> None:
    """Undo few_row_linears: every nn.Linear takes its class's forward again."""
    for module in model.modules():
        vars(module).pop("forward", None)


def _steps(model: nn.Module, rows: int, steps: int) -> tuple[list[float], list[list[int]]]:
    ids = torch.arange(1000, 1225)[None].expand(rows, -1)
    cache = DynamicCache()
    out = model(input_ids=ids, use_cache=True, past_key_values=cache, logits_to_keep=1)
    return greedy_steps(model, out.logits[:, -1].argmax(-1)[:, None], steps, lambda step: {"past_key_values": cache})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=layout.model_dir("qwen2.5-coder-0.5b"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 13])
    ap.add_argument("--out", type=Path, default=RECORDS / "decode.json")
    args = ap.parse_args()
    lm = load_model(args.model, "cpu", "float32")
    record = {"model": args.model.name, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "prompt_tokens": 225, "rows": {}}
    with torch.inference_mode():
        setups = {"stock": partial(_stock, lm.model), "kvpipe": partial(few_row_linears, lm.model)}
        for rows in args.rows:
            record["rows"][rows] = stock_against_kvpipe(setups, partial(_steps, lm.model, rows, args.steps))
            print(rows, record["rows"][rows], flush=True)
        head, x = lm.model.lm_head, torch.randn(3, lm.model.config.hidden_size)
        for name, f in (("stock", lambda: F.linear(x, head.weight)), ("kvpipe", lambda: torch.mm(head.weight, x.t()).t())):
            f()
            started = time.perf_counter()
            for _ in range(5):
                f()
            record.setdefault("output_layer_3_rows_ms", {})[name] = round((time.perf_counter() - started) / 5 * 1e3, 1)
    write_record(args.out, record)
    print(args.out.read_text())


if __name__ == "__main__":
    main()

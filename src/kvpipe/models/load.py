"""Load a materialised model directory (see kvpipe.models) for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvpipe.errors import KvpipeError
from kvpipe.io import read_json
from kvpipe.models.cpu_linear import few_row_linears
from kvpipe.models.gqa_attention import NAME as FOLDED_SDPA

CARD = "kvpipe_model.json"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what downstream stages record about it."""

    slug: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    card: dict[str, Any]
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when available, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KvpipeError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' means float32 on CPU and bfloat16 on CUDA (float16 overflows in large models)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a materialised model directory.

    fix_mistral_regex=False silences transformers 4.57's false alarm about Mistral's
    pre-tokenizer regex, raised for every locally saved tokenizer; no kvpipe model is Mistral.
    """
    return AutoTokenizer.from_pretrained(model_dir, fix_mistral_regex=False)


def load_model(model_dir: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a materialised model directory for inference."""
    model_dir = Path(model_dir)
    card = read_json(model_dir / CARD)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, use_safetensors=True)
    model.to(dev).eval()
    if model.config._attn_implementation == "sdpa":   # masked batches without a per-head copy of the cache
        model.set_attn_implementation(FOLDED_SDPA)
    if dev.type == "cpu":
        few_row_linears(model)
    tokenizer = load_tokenizer(model_dir)
    return LoadedModel(card["slug"], model, tokenizer, card, dev, torch_dtype)

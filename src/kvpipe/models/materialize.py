"""Materialise a model source into results/models/{model}/: safetensors, tokenizer, config and card.

The directory is built under a temporary name and renamed into place, so a failed or
interrupted materialisation leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from kvpipe.errors import KvpipeError
from kvpipe.io import atomic_path, sha256_file, sha256_json, write_json
from kvpipe.models.load import CARD
from kvpipe.models.sources import build_source


def fingerprint(directory: Path) -> str:
    """SHA-256 over the names and contents of every file of a model directory but the card."""
    return sha256_json({p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CARD})


def _check_chat_template(slug: str, spec: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer must have a chat template that renders a system and a user message, as every kvpipe prompt does."""
    if tokenizer.chat_template is None:
        raise KvpipeError(f"models.{slug}: the tokenizer has no chat template; name a Jinja file in models.{slug}.chat_template")
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                      tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as err:
        field = f"models.{slug}.chat_template" if spec.get("chat_template") else f"models.{slug}"
        first = str(err).splitlines()[0] if str(err) else ""
        raise KvpipeError(f"{field}: the chat template cannot render a system and a user message "
                          f"({type(err).__name__}: {first})") from None


def materialize(slug: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Build out_dir (safetensors weights, tokenizer, config, kvpipe_model.json) from a source spec."""
    out_dir = Path(out_dir)
    model, tokenizer = build_source(slug, spec)
    _check_chat_template(slug, spec, tokenizer)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg = model.config
        card = {
            "slug": slug,
            "source": spec,
            "architecture": cfg.model_type,
            "num_layers": cfg.num_hidden_layers,
            "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "fingerprint": fingerprint(tmp),
        }
        write_json(tmp / CARD, card)
    return card

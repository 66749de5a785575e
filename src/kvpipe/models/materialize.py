"""Materialise a model source into results/models/{model}/: safetensors, tokenizer, config and card.

The directory is built under a temporary name and renamed into place, so a failed or
interrupted materialisation leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpipe.errors import KvpipeError
from kvpipe.io import atomic_path, sha256_file, sha256_json, write_json
from kvpipe.models.load import CARD
from kvpipe.models.sources import build_source


def fingerprint(directory: Path) -> str:
    """SHA-256 over the names and contents of every file of a model directory but the card."""
    return sha256_json({p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CARD})


def materialize(slug: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Build out_dir (safetensors weights, tokenizer, config, kvpipe_model.json) from a source spec."""
    out_dir = Path(out_dir)
    model, tokenizer = build_source(slug, spec)
    if tokenizer.chat_template is None:
        raise KvpipeError(f"models.{slug}: the tokenizer has no chat template")
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

"""Seeded, deterministic sampling of QA examples shared by every model of a dataset.

The sample table depends only on the dataset and the `sampling` section: prompt lengths are
counted with the one tokenizer it names, so adding a pair or a model never resamples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from kvpipe.data.prompt import build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.io import write_parquet
from kvpipe.models.load import load_tokenizer


def load_dataset(name: str, spec: dict[str, Any]) -> pd.DataFrame:
    """All examples of a configured dataset, in the source's order."""
    if spec["source"] == "synthetic":
        from kvpipe.data.synthetic import generate

        return generate(spec["seed"], spec["passages"], spec["entities_per_passage"], spec["unanswerable_fraction"],
                        spec.get("mode", "single"), spec.get("hops"), spec.get("bridge", False), spec.get("length"))
    from kvpipe.data.squad import load_squad

    return load_squad(spec.get("path"), spec.get("hub_id"), spec["split"])


def sample(examples: pd.DataFrame, tokenizers: Sequence[PreTrainedTokenizerBase], prompt: dict[str, Any],
           sampling: dict[str, Any], dataset: str = "dataset", start: int = 0) -> pd.DataFrame:
    """Take the examples start..n-1 of a seeded permutation whose prompt fits every tokenizer.

    The permutation depends only on the seed and the example ids, so the same seed gives
    the same samples whatever the row order of the source; and it is walked in order, so
    sample i is the same for every n > i (growing n appends samples; a chunk [start, n) is
    the same rows as in the whole table). Columns added: sample_idx, prompt_tokens (the
    longest prompt over the tokenizers) and passage (id of the context).
    """
    pool = examples.sort_values("id", kind="stable").reset_index(drop=True)
    if sampling["answerable_only"]:
        pool = pool[~pool["is_impossible"]].reset_index(drop=True)
    order = np.random.default_rng(sampling["seed"]).permutation(len(pool))
    limit, n = sampling["max_context_tokens"], sampling["n"]
    kept, lengths = [], []
    for i in order:
        row = pool.iloc[i]
        longest = max(len(build_prompt(tok, prompt, row["context"], row["question"])) for tok in tokenizers)
        if longest <= limit:
            kept.append(i)
            lengths.append(longest)
            if len(kept) == n:
                break
    if len(kept) < n:
        raise KvpipeError(f"sampling.n: dataset {dataset} has only {len(kept)} examples whose prompt fits "
                          f"sampling.max_context_tokens={limit} (asked for {n})")
    out = pool.iloc[kept[start:]].reset_index(drop=True)
    out.insert(0, "sample_idx", np.arange(start, n, dtype=np.int32))
    out["prompt_tokens"] = np.asarray(lengths[start:], dtype=np.int32)
    out["passage"] = passage_ids(out["context"])
    return out


def passage_ids(contexts: pd.Series) -> np.ndarray:
    """A stable id per distinct context (first 16 hex digits of its SHA-256): questions on one passage share it."""
    return np.asarray([hashlib.sha256(c.encode()).hexdigest()[:16] for c in contexts], dtype=object)


def length_tokenizer(ref: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer that counts prompt lengths: a materialised model directory, else a hub tokenizer id."""
    if Path(ref).is_dir():
        return load_tokenizer(Path(ref))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ref))
    except Exception as err:  # the hub client raises many types; report it as one line
        raise KvpipeError(f"sampling.tokenizer: cannot load tokenizer {ref!r} ({str(err).splitlines()[0]})") from None


def sample_to_file(name: str, spec: dict[str, Any], tokenizer: str | Path, prompt: dict[str, Any],
                   sampling: dict[str, Any], out: Path, start: int = 0) -> pd.DataFrame:
    """Load a dataset, sample it (samples start..sampling.n-1) with the length tokenizer and write the table
    atomically."""
    frame = sample(load_dataset(name, spec), [length_tokenizer(tokenizer)], prompt, sampling, name, start)
    write_parquet(frame, Path(out))
    return frame

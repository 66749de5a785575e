"""Whether a pair's two models share a tokenizer, decided when the DAG is built (before any model exists).

The projection stage maps the scout's KV rows onto the main model's token by token, so it needs both
models to tokenise every prompt identically; the structure and selection stages align tokens by the
characters they cover (``kvpipe.alignment``) and need no such thing. A run whose ``run.stages``
includes ``projection`` is refused at DAG time for a pair whose tokenizers differ, or cannot be told
apart from the configuration, instead of failing in the projection job after both models were
materialised and extracted.

*Tokenizer* here means the tokenizer proper, the ``tokenizer.json`` a materialised model directory
holds (vocabulary, merges, normaliser, pre-tokeniser, special tokens); not the chat template, which
may differ between models that share a tokenizer (Qwen2.5-Coder 0.5B and 1.5B ship different
templates). Should two templates render the prompt into different tokens, the projection job still
stops on its first sample (``kvpipe.projection.answer``).

Each model offers up to three identities; a pair is compared on the first kind both models have:

1. ``files``: the SHA-256 of ``tokenizer.json`` of its materialised directory
   (``results/models/<slug>/``, once its card exists) or, for a ``local`` source, of its source
   directory. Exact: equal means same, different means different.
2. ``declared``: ``models.<slug>.tokenizer``, a name the config gives the model's tokenizer
   (``qwen2.5``, ``smollm2``, ...). Equal names mean same, different names mean different.
3. ``source``: what the source spec itself fixes. A ``tiny`` model's tokenizer is a function of
   its ``vocab_size``, ``tokenizer_seed`` and family (gemma3 or not): exact both ways. Two ``hf``
   models with the same ``id`` and ``revision`` share it; different ids tell nothing (Qwen2.5-3B and
   -7B share one), nor do ``gguf`` and ``pypi`` sources before they are materialised.

No kind in common, or only an inconclusive one, is *unknown*, which is refused too: the message asks
for ``models.<slug>.tokenizer`` on both models. The declared name never reaches a job's parameters
(``source_spec``), so adding it reruns nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpipe.errors import KvpipeError
from kvpipe.io import sha256_file

CARD = "kvpipe_model.json"  # as kvpipe.models.load.CARD, without importing the model stack
TOKENIZER_FILE = "tokenizer.json"

SAME, DIFFERENT, UNKNOWN = "same", "different", "unknown"


def source_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A model's source spec without the declared tokenizer name, which only this check reads."""
    return {key: value for key, value in spec.items() if key != "tokenizer"}


def identities(slug: str, spec: dict[str, Any], models_root: Path) -> dict[str, Any]:
    """The kinds of identity a model offers (files, declared, source) and their values."""
    found: dict[str, Any] = {}
    materialised = Path(models_root) / slug
    directory = materialised if (materialised / CARD).is_file() else None
    if directory is None and spec["source"] == "local":
        directory = Path(spec["path"])
    if directory is not None and (directory / TOKENIZER_FILE).is_file():
        found["files"] = sha256_file(directory / TOKENIZER_FILE)
    if spec.get("tokenizer"):
        found["declared"] = spec["tokenizer"]
    if spec["source"] == "tiny":
        family = "gemma3" if spec["arch"] == "gemma3" else "chatml"
        found["source"] = ("tiny", family, spec.get("vocab_size", 512), spec.get("tokenizer_seed", 0))
    elif spec["source"] == "hf":
        found["source"] = ("hf", spec["id"], spec.get("revision", "main"))
    return found


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """(same | different | unknown, how it was decided) for two models' identities."""
    for kind in ("files", "declared"):
        if kind in a and kind in b:
            how = "tokenizer.json" if kind == "files" else f"declared {a[kind]!r} and {b[kind]!r}"
            return (SAME if a[kind] == b[kind] else DIFFERENT), how
    if "source" in a and "source" in b:
        if a["source"] == b["source"]:
            return SAME, "source"
        if a["source"][0] == b["source"][0] == "tiny":
            return DIFFERENT, "tiny tokenizer settings"
    return UNKNOWN, "nothing comparable"


def pair_tokenizers(config: dict[str, Any], pair: str, models_root: Path = Path("results/models")) -> tuple[str, str]:
    """Whether a configured pair's scout and main share a tokenizer, and how that was decided."""
    scout, main = config["pairs"][pair]["scout"], config["pairs"][pair]["main"]
    return compare(identities(scout, config["models"][scout], models_root),
                   identities(main, config["models"][main], models_root))


def check_projection_tokenizers(config: dict[str, Any], models_root: Path = Path("results/models")) -> None:
    """Refuse a run whose stages include projection for a pair without a shared tokenizer (one line)."""
    if "projection" not in config["run"]["stages"]:
        return
    for pair in config["run"]["pairs"]:
        verdict, how = pair_tokenizers(config, pair, models_root)
        if verdict == SAME:
            continue
        scout, main = config["pairs"][pair]["scout"], config["pairs"][pair]["main"]
        if verdict == DIFFERENT:
            why = f"its scout {scout} and main {main} have different tokenizers ({how})"
        else:
            why = (f"nothing tells whether its scout {scout} and main {main} share a tokenizer: give both "
                   f"models.{scout}.tokenizer and models.{main}.tokenizer (the same name if they share it)")
        raise KvpipeError(f"run.stages: includes projection, which needs a shared tokenizer, but pair {pair} is in "
                          f"run.pairs and {why}; leave projection out of run.stages (as config/cross_family.yaml "
                          f"does) or {pair} out of run.pairs")

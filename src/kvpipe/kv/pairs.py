"""A pair's two KV datasets, read shard by shard, and the passage of each of their samples.

Models that tokenise every sample alike are paired token by token (the identity alignment);
otherwise each main token is paired with the scout tokens covering its characters (kvpipe.alignment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvpipe.alignment import Alignment, align, spans
from kvpipe.errors import KvpipeError
from kvpipe.io import sha256_file
from kvpipe.kv import store as kvstore

KINDS = kvstore.KINDS
TOKENS = ("sample_idx", "position", "token_id", "char_start", "char_end")   # what makes two rows the same token


def relative_depth(n_scout: int, n_main: int) -> list[tuple[int, int]]:
    """Scout layer i -> main layer round(i (Lm - 1) / (Ls - 1))."""
    if n_scout == 1:
        return [(0, n_main - 1)]
    return [(i, int(round(i * (n_main - 1) / (n_scout - 1)))) for i in range(n_scout)]


def _check_alignment(a: pa.Table, b: pa.Table, pair: str) -> None:
    for col in ("sample_idx", "position", "token_id"):
        if not a.column(col).equals(b.column(col)):
            raise KvpipeError(f"pair {pair}: scout and main tokens differ ({col}); this stage needs models that share "
                              "a tokenizer (only the structure and selection stages align tokens across tokenizers)")


def _keep(table: pa.Table, segments: list[str]) -> pa.Array:
    return pc.is_in(pc.cast(table.column("segment"), pa.string()), value_set=pa.array(segments, pa.string()))


def _spans(table: pa.Table) -> np.ndarray:
    return spans(*(table.column(c).to_numpy() for c in ("char_start", "char_end", "sample_idx")))


@dataclass(frozen=True)
class ShardRows:
    """The rows of one shard an analysis uses: the main rows of some segments, and the scout rows standing for them."""

    scout_keep: pa.Array       # row masks of the segments asked for, over each model's shard rows
    main_keep: pa.Array
    alignment: Alignment       # kept scout rows -> kept main rows
    main_segment: np.ndarray   # segment name of each kept main row
    sample_idx: np.ndarray     # sample of each matched main row: the rows the analysis sees


@dataclass
class AlignmentTally:
    """Tokens of the analysed segments over shards, and those without a counterpart in the other model."""

    segments: list[str]
    identity: bool = True
    main_tokens: int = 0
    scout_tokens: int = 0
    scout_unused: int = 0   # scout tokens that cover no character of a kept main token
    main_unmatched: dict[str, int] = field(default_factory=dict)   # per segment: main tokens no scout token covers

    def add(self, rows: ShardRows) -> None:
        al, unmatched = rows.alignment, ~rows.alignment.matched
        self.identity &= al.is_identity
        self.main_tokens += al.n_target
        self.scout_tokens += al.n_source
        self.scout_unused += int((~al.used).sum())
        for seg in self.segments:
            self.main_unmatched[seg] = self.main_unmatched.get(seg, 0) + int((unmatched & (rows.main_segment == seg)).sum())

    def facts(self, pool: str | None) -> dict[str, Any]:
        """Identity or not, the pooling used (None for the identity), the token counts."""
        return {"identity": self.identity, "pool": pool, "main_tokens": self.main_tokens,
                "main_unmatched": dict.fromkeys(self.segments, 0) | self.main_unmatched,
                "scout_tokens": self.scout_tokens, "scout_unused": self.scout_unused}


@dataclass
class PairData:
    """The two KV datasets of a pair, checked to describe the same samples."""

    pair: str
    scout: Path
    main: Path
    scout_manifest: dict[str, Any]
    main_manifest: dict[str, Any]

    @classmethod
    def open(cls, scout: Path, main: Path, pair: str) -> PairData:
        """Load both manifests; they must come from one sample table, sharded alike."""
        ms, mm = kvstore.load_manifest(scout), kvstore.load_manifest(main)
        if ms["key"]["samples_sha256"] != mm["key"]["samples_sha256"]:
            raise KvpipeError(f"pair {pair}: {scout} and {main} were extracted from different sample tables")
        if [s["samples"] for s in ms["shards"]] != [s["samples"] for s in mm["shards"]]:
            raise KvpipeError(f"pair {pair}: scout and main KV datasets are sharded differently (extraction.shard_size)")
        return cls(pair, Path(scout), Path(main), ms, mm)

    @property
    def n_shards(self) -> int:
        return len(self.scout_manifest["shards"])

    @property
    def n_samples(self) -> int:
        return int(self.scout_manifest["n_samples"])

    def aligned_layers(self) -> list[tuple[int, int]]:
        """(scout layer, main layer) pairs at the same relative depth that were extracted for both models."""
        ms, mm = self.scout_manifest, self.main_manifest
        aligned = [(s, m) for s, m in relative_depth(ms["num_layers"], mm["num_layers"])
                   if s in ms["layers"] and m in mm["layers"]]
        if not aligned:
            raise KvpipeError(f"pair {self.pair}: no aligned layers were extracted for both models (extraction.layers)")
        return aligned

    def select(self, shard: int, segments: list[str], scout_layer: int, main_layer: int) -> tuple[np.ndarray, pa.Array]:
        """One shard's row mask for the given segments and the sample id of each kept row; tokens checked alike."""
        meta = ["sample_idx", "position", "token_id", "segment"]
        scout = kvstore.read_shard(self.scout, scout_layer, shard, meta, self.scout_manifest)
        _check_alignment(scout, kvstore.read_shard(self.main, main_layer, shard, meta, self.main_manifest), self.pair)
        keep = _keep(scout, segments)
        return scout.column("sample_idx").to_numpy()[np.asarray(keep)], keep

    def rows(self, shard: int, segments: list[str], scout_layer: int, main_layer: int) -> ShardRows:
        """One shard's rows of the given segments and how they align: the identity where both models' tokens are
        the same (sample, position, id and characters), else by the characters they cover."""
        meta = [*TOKENS, "segment"]
        scout = kvstore.read_shard(self.scout, scout_layer, shard, meta, self.scout_manifest)
        main = kvstore.read_shard(self.main, main_layer, shard, meta, self.main_manifest)
        s_keep, m_keep = _keep(scout, segments), _keep(main, segments)
        scout, main = scout.filter(s_keep), main.filter(m_keep)
        segment = pc.cast(main.column("segment"), pa.string()).to_numpy(zero_copy_only=False)
        if all(scout.column(c).equals(main.column(c)) for c in TOKENS):
            return ShardRows(s_keep, m_keep, Alignment.identity(len(main)), segment, main.column("sample_idx").to_numpy())
        alignment = align(_spans(scout), _spans(main))
        return ShardRows(s_keep, m_keep, alignment, segment, alignment.targets(main.column("sample_idx").to_numpy()))

    def layer(self, shard: int, role: str, layer: int, kinds: list[str], keep: pa.Array) -> dict[str, np.ndarray]:
        """float64 rows of the kept tokens, per kind, of one (role, layer) shard file; only those columns are read."""
        root, manifest = (self.scout, self.scout_manifest) if role == "scout" else (self.main, self.main_manifest)
        table = kvstore.read_shard(root, layer, shard, list(kinds), manifest).filter(keep)
        return {kind: kvstore.matrix(table, kind).astype(np.float64) for kind in kinds}

    def matrices(self, shard: int, rows: ShardRows, scout_layers: list[int], main_layers: list[int],
                 pool: str | None) -> dict[tuple[str, int, str], np.ndarray]:
        """float64 rows per (role, layer, kind) of one shard's matched main tokens: the main's own rows, and the
        scout rows covering each, pooled by `pool` (kvpipe.alignment.POOLS; unused by the identity alignment)."""
        al = rows.alignment
        mats = {("scout", layer, kind): al.pool(m, pool) for layer in scout_layers
                for kind, m in self.layer(shard, "scout", layer, KINDS, rows.scout_keep).items()}
        mats.update({("main", layer, kind): al.targets(m) for layer in main_layers
                     for kind, m in self.layer(shard, "main", layer, KINDS, rows.main_keep).items()})
        return mats


def read_passages(samples: Path, kv_root: Path) -> np.ndarray:
    """The passage id of each sample (indexed by sample_idx), from the sample table the KV dataset was extracted from."""
    samples = Path(samples)
    if "passage" not in pq.read_schema(samples).names:
        raise KvpipeError(f"{samples}: no 'passage' column; rerun the sampling stage")
    if sha256_file(samples) != kvstore.load_manifest(kv_root)["key"]["samples_sha256"]:
        raise KvpipeError(f"{samples}: not the sample table the KV dataset {kv_root} was extracted from")
    table = pq.read_table(samples, columns=["sample_idx", "passage"])
    idx = table.column("sample_idx").to_numpy()
    if not np.array_equal(np.sort(idx), np.arange(len(idx))):
        raise KvpipeError(f"{samples}: sample_idx is not 0..{len(idx) - 1}")
    passages = np.empty(len(idx), dtype=object)
    passages[idx] = table.column("passage").to_pylist()
    return passages

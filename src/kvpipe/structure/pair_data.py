"""A pair's two KV datasets, read shard by shard, and the passage of each of their samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvpipe.errors import KvpipeError
from kvpipe.io import sha256_file
from kvpipe.kv import store as kvstore

KINDS = kvstore.KINDS


def relative_depth(n_scout: int, n_main: int) -> list[tuple[int, int]]:
    """Scout layer i -> main layer round(i (Lm - 1) / (Ls - 1))."""
    if n_scout == 1:
        return [(0, n_main - 1)]
    return [(i, int(round(i * (n_main - 1) / (n_scout - 1)))) for i in range(n_scout)]


def _check_alignment(a: pa.Table, b: pa.Table, pair: str) -> None:
    for col in ("sample_idx", "position", "token_id"):
        if not a.column(col).equals(b.column(col)):
            raise KvpipeError(f"pair {pair}: scout and main tokens differ ({col}); the models must share a tokenizer "
                              "(token alignment across tokenizers is not implemented)")


@dataclass
class PairData:
    """The two KV datasets of a pair, checked to describe the same samples and tokens."""

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
        keep = pc.is_in(pc.cast(scout.column("segment"), pa.string()), value_set=pa.array(segments, pa.string()))
        return scout.column("sample_idx").to_numpy()[np.asarray(keep)], keep

    def layer(self, shard: int, role: str, layer: int, kinds: list[str], keep: pa.Array) -> dict[str, np.ndarray]:
        """float64 rows of the kept tokens, per kind, of one (role, layer) shard file; only those columns are read."""
        root, manifest = (self.scout, self.scout_manifest) if role == "scout" else (self.main, self.main_manifest)
        table = kvstore.read_shard(root, layer, shard, list(kinds), manifest).filter(keep)
        return {kind: kvstore.matrix(table, kind).astype(np.float64) for kind in kinds}

    def matrices(self, shard: int, scout_layers: list[int], main_layers: list[int],
                 segments: list[str]) -> tuple[np.ndarray, dict[tuple[str, int, str], np.ndarray]]:
        """Sample ids and float64 rows of the given segments, per (role, layer, kind), of one shard."""
        sample_idx, keep = self.select(shard, segments, scout_layers[0], main_layers[0])
        mats = {(role, layer, kind): m for role, layers in (("scout", scout_layers), ("main", main_layers))
                for layer in layers for kind, m in self.layer(shard, role, layer, KINDS, keep).items()}
        return sample_idx, mats


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

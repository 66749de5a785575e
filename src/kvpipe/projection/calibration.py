"""The projectors' training and test rows: the pair's KV datasets, split by passage, streamed shard by shard.

Rows are the tokens a given cache holds before the question (segments template and context).
For main layer j and mapped kind, X is the scout's layer layer_map[j] and Y the main's layer j:

    key        pre-RoPE keys (the main's own RoPE is applied after mapping)
    key_post   post-RoPE keys, mapped directly (a comparison: the scout lacks half the main's frequencies
               when head sizes differ)
    value      values

Calibration passages are dealt to CV folds (kvpipe.splits.split_by_passage); the last fold is
also the held-out validation part for iterative fits (MLP, attention objective). Memory is one
layer of one shard of both models plus the per-(layer, kind, fold) sufficient statistics, whatever the n.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kvpipe.errors import KvpipeError
from kvpipe.kv.pairs import PairData
from kvpipe.linalg.ridge import RidgeStats
from kvpipe.settings import ProjectionSettings
from kvpipe.splits import split_by_passage

COLUMN = {"key": "key_pre_rope", "key_post": "key", "value": "value"}   # mapped kind -> KV dataset column
SEGMENTS = ["template", "context"]
Rows = tuple[tuple[int, str], tuple[np.ndarray, np.ndarray]]   # ((main layer, kind), (X, Y))


@dataclass
class Calibration:
    """A pair's KV datasets with the passage split and the layer map; streams (X, Y) blocks."""

    data: PairData
    layer_map: list[int]
    kinds: tuple[str, ...]
    fold_of: np.ndarray      # per sample_idx: calibration fold, or -1 for test
    folds: int

    @classmethod
    def open(cls, scout_kv: Path, main_kv: Path, passages: np.ndarray, pair: str, layer_map: list[int],
             kinds: tuple[str, ...], cfg: ProjectionSettings) -> Calibration:
        """Open both datasets (they must hold every layer the map uses) and split their passages."""
        data = PairData.open(Path(scout_kv), Path(main_kv), pair)
        ms, mm = data.scout_manifest, data.main_manifest
        if len(layer_map) != mm["num_layers"] or set(mm["layers"]) != set(range(mm["num_layers"])):
            raise KvpipeError(f"pair {pair}: projection needs every main layer in {main_kv} (extraction.layers: all)")
        missing = sorted(set(layer_map) - set(ms["layers"]))
        if missing:
            raise KvpipeError(f"pair {pair}: scout layer {missing[0]} of the layer map is not in {scout_kv}")
        fold_of, _ = split_by_passage(passages, cfg.calibration_fraction, cfg.cv_folds, cfg.seed, "projection")
        return cls(data, layer_map, kinds, fold_of, cfg.cv_folds)

    @property
    def widths(self) -> tuple[int, int]:
        """(scout, main) row widths: num_kv_heads * head_dim."""
        return self.data.scout_manifest["width"], self.data.main_manifest["width"]

    @property
    def validation_fold(self) -> int:
        return self.folds - 1

    def part(self, sample_idx: np.ndarray, which: str) -> np.ndarray:
        """Row mask: 'calibration' (all folds), 'train' (all but the validation fold), 'validation' or 'test'."""
        fold = self.fold_of[sample_idx]
        return {"calibration": fold >= 0, "train": (fold >= 0) & (fold != self.validation_fold),
                "validation": fold == self.validation_fold, "test": fold == -1}[which]

    def blocks(self, which: str, desc: str = "") -> Iterator[tuple[np.ndarray, Iterator[Rows]]]:
        """Per shard with rows in `which`: their sample ids and, read one main layer at a time, the (X, Y) rows
        of every (main layer, kind) in layer order. Memory is one layer of one shard of each model."""
        for shard in tqdm(range(self.data.n_shards), desc=f"projection {self.data.pair}: {desc or which}", unit="shard"):
            lo, hi = self.data.scout_manifest["shards"][shard]["samples"]
            if not self.part(np.arange(lo, hi), which).any():
                continue   # nothing of this part in the shard: do not read it
            sample_idx, keep = self.data.select(shard, SEGMENTS, self.layer_map[0], 0)
            rows = self.part(sample_idx, which)
            if rows.any():
                yield sample_idx[rows], self._rows(shard, keep, None if rows.all() else rows)

    def _rows(self, shard: int, keep: Any, rows: np.ndarray | None) -> Iterator[Rows]:
        columns = sorted({COLUMN[kind] for kind in self.kinds})
        scout_layer, scout = -1, {}
        for j, s in enumerate(self.layer_map):
            if s != scout_layer:   # consecutive main layers often share their scout layer
                scout_layer, scout = s, self.data.layer(shard, "scout", s, columns, keep)
            main = self.data.layer(shard, "main", j, columns, keep)
            for kind in self.kinds:
                X, Y = scout[COLUMN[kind]], main[COLUMN[kind]]
                yield (j, kind), (X, Y) if rows is None else (X[rows], Y[rows])

    def statistics(self) -> dict[tuple[int, str, int], RidgeStats]:
        """Sufficient statistics per (main layer, kind, calibration fold), in one pass."""
        p, q = self.widths
        stats = {(j, kind, f): RidgeStats(p, q) for j in range(len(self.layer_map)) for kind in self.kinds
                 for f in range(self.folds)}
        for sample_idx, block in self.blocks("calibration", "statistics"):
            fold = self.fold_of[sample_idx]
            for (j, kind), (X, Y) in block:
                for f in np.unique(fold):
                    stats[(j, kind, int(f))].add(X[fold == f], Y[fold == f])
        return stats

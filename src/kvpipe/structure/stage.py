"""The structural-analysis stage: scout -> main transfer of keys and values, layer by layer.

Reads the two KV datasets of a pair shard by shard (memory bounded by one shard plus a
fixed-size CKA subsample), splits *passages* into calibration and test sets (questions on one
passage share their context rows), and for each kind (post-RoPE keys, pre-RoPE keys, values)
and aligned (scout layer, main layer):

  - fits a ridge map on calibration tokens (α by k-fold CV over calibration passages) and
    scores it on test tokens: per-token cosine, relative Frobenius error, centred R²;
    R² is pooled (variance-weighted) and also averaged uniformly over output dimensions;
  - scores the baselines the same way: the calibration-mean predictor, a map fitted on
    shuffled token pairings, the main model paired with itself, and a position-only map
    from the RoPE basis of each token's position (structure/position.py);
  - per main head as well as for the whole layer;
  - fits a regularised CCA (SVCCA-style, kvpipe.linalg.cca) on calibration tokens and scores the mean
    of its top canonical correlations on test tokens, and on test tokens whose main rows are
    permuted across tokens (shard by shard, like the shuffled ridge baseline): the null;
  - bootstrap CIs over test *passages* (all figures come from per-passage sums), paired
    R² differences per layer with Holm-adjusted bootstrap p-values, and R² slopes over depth.

Linear CKA (biased and debiased) is computed for every scout layer x main layer on a
seeded token subsample, with delete-half jackknife intervals (over passages) for the aligned pairs.

Rows are the main model's tokens. A pair that tokenises every sample alike pairs token i with token i;
otherwise each main token is paired with the scout tokens covering its characters, pooled by
`alignment.pool` (kvpipe.alignment), and main tokens no scout token covers (template tokens, for
one) are left out and counted (facts `alignment`).
Writes metrics.parquet and facts.json; structure/report.py turns them into the summary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from kvpipe.errors import KvpipeError
from kvpipe.io import write_json, write_parquet
from kvpipe.kv.pairs import KINDS, AlignmentTally, PairData, ShardRows, read_passages
from kvpipe.linalg.cca import CanonicalMap, cca_sizes, fit_cca, unit_sums
from kvpipe.linalg.ridge import LinearMap, RidgeStats, choose_alpha, dim_scores, fit_ridge, mean_map, pooled, row_scores
from kvpipe.settings import StructureSettings, from_section
from kvpipe.splits import split_by_passage
from kvpipe.stats import bootstrap_counts, cluster_codes
from kvpipe.structure import records as rec
from kvpipe.structure.cka_table import TokenSubsample, cka_records
from kvpipe.structure.position import rope_basis

PREDICTORS, FITTED, DIM_PREDICTORS = rec.PREDICTORS, rec.FITTED, rec.DIM_PREDICTORS
# Random streams drawn from `structure.seed`: offsets added to it (the passage split and the CKA subsample use it as is)
SHUFFLE_SEED = 1     # the shuffled-pairing ridge baseline's permutations (calibration pass)
BOOTSTRAP_SEED = 2   # the bootstrap over test passages
JACKKNIFE_SEED = 3   # the CKA jackknife halves
CCA_NULL_SEED = 4    # the CCA null's permutations (test pass)


@dataclass(frozen=True)
class _Run:
    """What every step of one pair's analysis shares."""

    data: PairData
    cfg: StructureSettings
    aligned: list[tuple[int, int]]
    groups: list[slice]   # column groups scored: the whole main layer, then each main KV head
    fold_of: np.ndarray   # calibration fold per sample_idx, -1 = test
    test_ids: np.ndarray  # sorted test sample ids
    unit_of: np.ndarray   # test passage index (the bootstrap unit) per sample_idx, -1 = calibration
    n_units: int          # test passages

    def shards(self, what: str) -> Iterable[int]:
        """The shard indices, with a progress bar on stderr (the rule log)."""
        return tqdm(range(self.data.n_shards), desc=f"structure {self.data.pair}: {what}", unit="shard")

    @property
    def pool(self) -> str:
        """alignment.pool: read only for a pair whose tokens differ (the identity alignment pools nothing)."""
        if self.cfg.alignment is None:
            raise KvpipeError(f"pair {self.data.pair}: its tokenizers differ, and no alignment.pool was given")
        return self.cfg.alignment.pool

    def matrices(self, shard: int, scout_layers: list[int],
                 main_layers: list[int]) -> tuple[ShardRows, dict[tuple[str, int, str], np.ndarray]]:
        """One shard's aligned rows of the analysed segments and their float64 matrices per (role, layer, kind)."""
        rows = self.data.rows(shard, self.cfg.segments, scout_layers[0], main_layers[0])
        pool = None if rows.alignment.is_identity else self.pool
        return rows, self.data.matrices(shard, rows, scout_layers, main_layers, pool)


def _prepare(scout_root: Path, main_root: Path, passages: np.ndarray, pair: str, cfg: StructureSettings) -> _Run:
    """Open and check the pair's data, align layers and split passages into calibration folds and test."""
    data = PairData.open(scout_root, main_root, pair)
    if len(passages) != data.n_samples:
        raise KvpipeError(f"pair {pair}: {len(passages)} passage ids for {data.n_samples} samples")
    fold_of, test_ids = split_by_passage(passages, cfg.calibration_fraction, cfg.cv_folds, cfg.seed)
    head_dim = data.main_manifest["head_dim"]
    groups = [slice(None)] + [slice(h * head_dim, (h + 1) * head_dim) for h in range(data.main_manifest["num_kv_heads"])]
    unit_of = np.full(len(passages), -1)
    unit_of[test_ids], n_units = cluster_codes(passages[test_ids])
    return _Run(data, cfg, data.aligned_layers(), groups, fold_of, test_ids, unit_of, n_units)


def _inputs(run: _Run, mats: dict[tuple[str, int, str], np.ndarray], kind: str, s: int, m: int,
            rows: np.ndarray) -> dict[str, np.ndarray]:
    """The input rows of each fitted predictor: scout rows, main rows (self), the main's RoPE basis (position)."""
    basis = rope_basis(mats[("main", m, "key")][rows], mats[("main", m, "key_pre_rope")][rows],
                       run.data.main_manifest["head_dim"])
    return {"none": mats[("scout", s, kind)][rows], "self": mats[("main", m, kind)][rows], "position": basis}


def _calibrate(run: _Run) -> tuple[dict[tuple, RidgeStats], TokenSubsample, AlignmentTally]:
    """Pass 1: ridge statistics per (kind, scout layer, main layer, fitted predictor, fold), the CKA subsample and
    the token alignment's counts."""
    ms, mm, folds = run.data.scout_manifest, run.data.main_manifest, run.cfg.cv_folds
    width = {"none": ms["width"], "shuffled": ms["width"], "self": mm["width"], "position": mm["head_dim"]}
    stats = {(kind, s, m, pred, f): RidgeStats(width[pred], mm["width"])
             for kind in KINDS for s, m in run.aligned for pred in FITTED for f in range(folds)}
    sub = TokenSubsample(run.cfg.cka_tokens, run.cfg.seed)
    tally = AlignmentTally(run.cfg.segments)
    shuffle_rng = np.random.default_rng(run.cfg.seed + SHUFFLE_SEED)
    for shard in run.shards("calibration pass"):
        # every layer, not only the aligned ones: CKA compares them all
        shard_rows, mats = run.matrices(shard, sorted(ms["layers"]), sorted(mm["layers"]))
        tally.add(shard_rows)
        sample_idx = shard_rows.sample_idx
        sub.offer(sample_idx, mats)
        fold = run.fold_of[sample_idx]
        for f in range(folds):
            rows = fold == f
            if not rows.any():
                continue
            perm = shuffle_rng.permutation(int(rows.sum()))
            for kind in KINDS:
                for s, m in run.aligned:
                    X, Y = _inputs(run, mats, kind, s, m, rows), mats[("main", m, kind)][rows]
                    for pred in ("none", "self", "position"):
                        stats[(kind, s, m, pred, f)].add(X[pred], Y)
                    stats[(kind, s, m, "shuffled", f)].add(X["none"], Y[perm])
    return stats, sub, tally


def _fit_maps(run: _Run, stats: dict[tuple, RidgeStats]) -> tuple[dict[tuple, LinearMap], dict[str, float]]:
    """Every predictor's map on all calibration folds, α chosen by CV over the folds; and the chosen αs."""
    grid = np.asarray(run.cfg.alpha_grid, dtype=np.float64)
    folds = range(run.cfg.cv_folds)
    maps, alphas = {}, {}
    for kind in KINDS:
        for s, m in run.aligned:
            for pred in FITTED:
                fold_stats = [stats[(kind, s, m, pred, f)] for f in folds]
                alpha = choose_alpha(fold_stats, grid)
                maps[(kind, s, m, pred)] = fit_ridge(pooled(fold_stats), alpha)
                alphas[f"{kind}/{s}->{m}/{pred}"] = alpha
            maps[(kind, s, m, "mean")] = mean_map(pooled([stats[(kind, s, m, "none", f)] for f in folds]))
    return maps, alphas


def _fit_cca(run: _Run, stats: dict[tuple, RidgeStats]) -> dict[tuple, CanonicalMap]:
    """Regularised CCA per (kind, scout layer, main layer) from the calibration statistics of the ridge pass."""
    cfg, folds = run.cfg.cca, range(run.cfg.cv_folds)
    return {(kind, s, m): fit_cca(pooled([stats[(kind, s, m, "none", f)] for f in folds]),
                                  pooled([stats[(kind, s, m, "self", f)] for f in folds]),
                                  cfg.components, cfg.regularisation, cfg.top)
            for kind in KINDS for s, m in run.aligned}


def _cca_facts(run: _Run) -> dict[str, Any]:
    """The CCA settings and the sizes they give on this pair (SVD components per side, canonical pairs scored)."""
    cfg = run.cfg.cca
    kx, ky, top = cca_sizes(run.data.scout_manifest["width"], run.data.main_manifest["width"], cfg.components,
                            cfg.top)
    return {"scout_components": kx, "main_components": ky, "top": top, "regularisation": cfg.regularisation}


def _score_test(run: _Run, maps: dict[tuple, LinearMap],
                cca: dict[tuple, CanonicalMap]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pass 2, summed per test passage: row_scores [kind, aligned, predictor, passage, group, 4], dim_scores of
    DIM_PREDICTORS [kind, aligned, predictor, passage, q, 2], CCA unit_sums of CCA_PAIRINGS (true, then main
    rows permuted across the shard's test tokens) [kind, aligned, pairing, passage, top, 5] and tokens per passage."""
    width = run.data.main_manifest["width"]
    scores = np.zeros((len(KINDS), len(run.aligned), len(PREDICTORS), run.n_units, len(run.groups), 4))
    dims = np.zeros((len(KINDS), len(run.aligned), len(DIM_PREDICTORS), run.n_units, width, 2))
    cca_sums = np.zeros((len(KINDS), len(run.aligned), len(rec.CCA_PAIRINGS), run.n_units, _cca_facts(run)["top"], 5))
    tokens = np.zeros(run.n_units)
    shuffle_rng = np.random.default_rng(run.cfg.seed + CCA_NULL_SEED)
    scout_ls, main_ls = sorted({s for s, _ in run.aligned}), sorted({m for _, m in run.aligned})
    for shard in run.shards("test pass"):
        shard_rows, mats = run.matrices(shard, scout_ls, main_ls)
        sample_idx = shard_rows.sample_idx
        is_test = run.fold_of[sample_idx] == -1
        if not is_test.any():
            continue
        units = run.unit_of[sample_idx[is_test]]
        np.add.at(tokens, units, 1)
        perm = shuffle_rng.permutation(int(is_test.sum()))
        for k, kind in enumerate(KINDS):
            for a, (s, m) in enumerate(run.aligned):
                X, Y = _inputs(run, mats, kind, s, m, is_test), mats[("main", m, kind)][is_test]
                y_ref = maps[(kind, s, m, "mean")].b
                for j, Y_paired in enumerate((Y, Y[perm])):
                    cca_sums[k, a, j] += unit_sums(cca[(kind, s, m)], X["none"], Y_paired, units, run.n_units)
                for j, pred in enumerate(PREDICTORS):
                    Y_hat = maps[(kind, s, m, pred)].predict(X["none" if pred in ("mean", "shuffled") else pred])
                    for unit in np.unique(units):
                        rows = units == unit
                        scores[k, a, j, unit] += row_scores(Y_hat[rows], Y[rows], y_ref, run.groups)
                        if pred in DIM_PREDICTORS:
                            dims[k, a, DIM_PREDICTORS.index(pred), unit] += dim_scores(Y_hat[rows], Y[rows], y_ref)
    return scores, dims, cca_sums, tokens


def _facts(run: _Run, passages: np.ndarray, tokens: np.ndarray, sub: TokenSubsample, alphas: dict[str, float],
           tally: AlignmentTally) -> dict[str, Any]:
    """Sizes, split and settings of the run: what the report states beside the figures."""
    ms, mm, cfg = run.data.scout_manifest, run.data.main_manifest, run.cfg
    test = run.fold_of == -1
    return {"pair": run.data.pair, "scout": ms["model"], "main": mm["model"], "n_samples": ms["n_samples"],
            "n_passages": len(np.unique(passages)), "n_calibration_passages": len(np.unique(passages[~test])),
            "n_test_passages": len(np.unique(passages[test])), "n_calibration_samples": int((~test).sum()),
            "n_test_samples": len(run.test_ids), "n_test_tokens": int(tokens.sum()), "cka_tokens": int(len(sub.keys)),
            "segments": cfg.segments, "aligned_layers": run.aligned, "alphas": alphas, "cv_folds": cfg.cv_folds,
            "bootstrap": cfg.bootstrap, "ci": cfg.ci, "scout_head_dim": ms["head_dim"], "main_head_dim": mm["head_dim"],
            "thresholds": cfg.thresholds, "cca": _cca_facts(run),
            "alignment": tally.facts(None if tally.identity else run.pool)}


def analyse_pair(scout_root: Path, main_root: Path, passages: np.ndarray, pair: str,
                 section: Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The tidy metrics table of a pair and a dict of run facts; passages[i] is the passage id of sample i.
    section: the validated structure section and, for a pair whose tokens differ, `alignment` (the alignment
    section's pool); read once into StructureSettings."""
    cfg = from_section(StructureSettings, section)
    passages = np.asarray(passages)
    run = _prepare(Path(scout_root), Path(main_root), passages, pair, cfg)
    stats, sub, tally = _calibrate(run)
    maps, alphas = _fit_maps(run, stats)
    scores, dims, cca_sums, tokens = _score_test(run, maps, _fit_cca(run, stats))
    counts = bootstrap_counts(run.n_units, cfg.bootstrap, cfg.seed + BOOTSTRAP_SEED)  # resamples test passages
    records = rec.transfer_records(run.aligned, run.groups, scores, dims, tokens, counts, cfg.ci)
    records += rec.cca_records(run.aligned, cca_sums, tokens, counts, cfg.ci)
    point, reps = rec.layer_r2(scores, tokens, counts)
    records += rec.difference_records(run.aligned, point, reps, cfg.ci)
    records += rec.depth_slope_records(run.aligned, run.data.scout_manifest["num_layers"], point, reps, cfg.ci)
    records += cka_records(sub, sorted(run.data.scout_manifest["layers"]), sorted(run.data.main_manifest["layers"]),
                           set(run.aligned), cfg.ci, cfg.seed + JACKKNIFE_SEED, passages)
    table = pd.DataFrame.from_records(records)
    table.insert(0, "pair", pair)
    return table, _facts(run, passages, tokens, sub, alphas, tally)


def run_structure(scout_kv: Path, main_kv: Path, samples: Path, pair: str, cfg: Mapping[str, Any], out_dir: Path) -> None:
    """Analyse a pair (KV dataset directories, the sample table they come from); write metrics.parquet and facts.json."""
    table, facts = analyse_pair(Path(scout_kv), Path(main_kv), read_passages(Path(samples), Path(scout_kv)), pair, cfg)
    write_json(Path(out_dir) / "facts.json", facts)
    write_parquet(table, Path(out_dir) / "metrics.parquet")

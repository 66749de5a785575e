"""Fitting reads only calibration passages: the structure stage's maps and every saved projector stay byte-identical
when the test passages' KV (and text) change on disk, and change when one calibration passage does.

Each case alters a copy of the tiny KV stores: every vector of the chosen samples' rows is shifted, the shard files
are rewritten and the manifests re-hashed (so the stages' hash checks accept them); for the projection stage the
chosen samples' context text changes too (the attention, distill and hidden-state fits run the models on text).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_projection

from kvpipe.io import sha256_file, write_json
from kvpipe.kv import store as kvstore
from kvpipe.kv.pairs import read_passages
from kvpipe.projection.stage import run_projection
from kvpipe.settings import StructureSettings, from_section
from kvpipe.splits import split_by_passage
from kvpipe.structure import stage as structure_stage

kv_dirs = test_projection.kv_dirs  # the projection tests' KV stores of the tiny pair
ROLES = ("tiny-scout", "tiny-main")


def _shift_store(store: Path, samples: set[int], samples_sha256: str, shift: float = 7.0) -> None:
    """Shift every key/value vector of the given samples' rows in place; re-hash the manifest."""
    manifest = kvstore.load_manifest(store)
    for shard in manifest["shards"]:
        for rel in shard["files"]:
            table = pq.read_table(store / rel)
            rows = np.isin(table.column("sample_idx").to_numpy(), list(samples))[:, None]
            for kind in kvstore.KINDS:
                mat = kvstore.matrix(table, kind)
                field = table.schema.field(kind)
                values = pa.array(np.where(rows, mat + shift, mat).reshape(-1), type=field.type.value_type)
                table = table.set_column(
                    table.schema.get_field_index(kind), field, pa.FixedSizeListArray.from_arrays(values, mat.shape[1])
                )
            shard["files"][rel] = kvstore.write_table(table, store / rel, "none")
    manifest["key"]["samples_sha256"] = samples_sha256
    write_json(store / kvstore.MANIFEST, manifest)


def altered(kv_dirs: Path, samples_path: Path, samples: set[int], dest: Path) -> tuple[Path, Path]:
    """Copies of both KV stores and of the sample table with the given samples' KV and context text altered."""
    table = pd.read_parquet(samples_path)
    table.loc[table["sample_idx"].isin(samples), "context"] = "river mountain " * 20
    dest.mkdir()
    table.to_parquet(dest / "samples.parquet", index=False)
    for role in ROLES:
        shutil.copytree(kv_dirs / role, dest / role)
        _shift_store(dest / role, samples, sha256_file(dest / "samples.parquet"))
    return dest, dest / "samples.parquet"


def _split(samples_path: Path, kv_root: Path, cfg: dict) -> tuple[set[int], int]:
    """The test samples of a stage's split, and one calibration sample."""
    fold_of, test_ids = split_by_passage(
        read_passages(samples_path, kv_root), cfg["calibration_fraction"], cfg["cv_folds"], cfg["seed"]
    )
    return set(test_ids.tolist()), int(np.flatnonzero(fold_of >= 0)[0])


def _digest(arrays: dict) -> str:
    """SHA-256 over every array of a dict of maps, in key order."""
    digest = hashlib.sha256()
    for key in sorted(arrays, key=str):
        for value in vars(arrays[key]).values():
            digest.update(str(key).encode() + np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _structure_maps(kv: Path, samples_path: Path, cfg: dict) -> str:
    """The digest of every ridge map (all predictors and the mean) and CCA map the structure stage fits."""
    passages = read_passages(samples_path, kv / "tiny-scout")
    settings = from_section(StructureSettings, cfg)
    run = structure_stage._prepare(kv / "tiny-scout", kv / "tiny-main", passages, "tiny", settings)
    stats, _, _ = structure_stage._calibrate(run)
    maps, alphas = structure_stage._fit_maps(run, stats)
    return _digest(maps) + _digest(structure_stage._fit_cca(run, stats)) + json.dumps(alphas, sort_keys=True)


def test_structure_maps_read_only_calibration_passages(kv_dirs, samples_path, smoke_config, tmp_path):
    cfg = smoke_config["structure"]
    test, calibration = _split(samples_path, kv_dirs / "tiny-scout", cfg)
    assert test and calibration not in test
    expected = _structure_maps(kv_dirs, samples_path, cfg)
    assert _structure_maps(*altered(kv_dirs, samples_path, test, tmp_path / "test"), cfg) == expected
    assert _structure_maps(*altered(kv_dirs, samples_path, {calibration}, tmp_path / "cal"), cfg) != expected


PROJECTION = {
    "projectors": ["ridge", "shared", "mlp", "gated"],
    "objectives": ["reconstruction", "attention", "distill"],
    "conditions": ["main_full", "projected_hidden", "fused"],
    "max_test_samples": 1,
    "ttft_samples": 0,
}


def _projectors(kv: Path, samples_path: Path, model_dirs: dict, smoke_config: dict, out: Path) -> dict[str, bytes]:
    """Every file the projection stage saves under projectors/: the weights as bytes, the cards without the hash
    of the KV files they were fitted from (it names every shard, test shards included)."""
    cfg = smoke_config["projection"] | PROJECTION
    extra = {"source": "synthetic", "seed": 1009, "passages": 2, "target": "continuation", "path": None, "question_tokens": 8}
    cfg["distill"] = cfg["distill"] | {"extra": extra}  # extra passages: never a test passage either
    run_projection(
        kv / "tiny-scout",
        kv / "tiny-main",
        samples_path,
        model_dirs["tiny-scout"],
        model_dirs["tiny-main"],
        "tiny",
        cfg,
        smoke_config["prompt"],
        "cpu",
        "float32",
        out,
    )
    assert not (out / "checkpoints").exists()  # the distill checkpoints are removed once the fits end
    files = {}
    for path in sorted((out / "projectors").iterdir()):
        if path.suffix == ".json":
            card = json.loads(path.read_text())
            card.pop("fit_data_sha256", None)
            files[path.name] = json.dumps(card, sort_keys=True).encode()
        else:
            files[path.name] = path.read_bytes()
    return files


@pytest.mark.slow  # the projection stage, three times
def test_saved_projectors_read_only_calibration_passages(kv_dirs, samples_path, model_dirs, smoke_config, tmp_path):
    test, calibration = _split(samples_path, kv_dirs / "tiny-scout", smoke_config["projection"])
    expected = _projectors(kv_dirs, samples_path, model_dirs, smoke_config, tmp_path / "a")
    weights = {f"{p}-{o}.safetensors" for p in PROJECTION["projectors"] for o in PROJECTION["objectives"]}
    weights.add("hidden-reconstruction.safetensors")  # the projected_hidden condition's ridge map into the main
    weights.add("fuser-next_token.safetensors")  # the fused condition's fuser
    assert weights <= set(expected)
    got = _projectors(*altered(kv_dirs, samples_path, test, tmp_path / "test"), model_dirs, smoke_config, tmp_path / "b")
    assert got == expected
    moved = _projectors(
        *altered(kv_dirs, samples_path, {calibration}, tmp_path / "cal"), model_dirs, smoke_config, tmp_path / "c"
    )
    assert {name for name in weights if moved[name] != expected[name]} == weights  # the test can fail

"""A truncated or altered KV shard is caught by its manifest SHA-256 in every stage that reads it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvpipe.errors import KvpipeError
from kvpipe.kv import extract as ex
from kvpipe.kv import store as kvstore
from kvpipe.kv.pairs import read_passages
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.layer_map import relative_depth
from kvpipe.settings import ProjectionSettings, from_section
from kvpipe.structure.stage import analyse_pair

EXTRACTION = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 4, "compression": "none"}
SHARD = kvstore.shard_file(1, 1)


@pytest.fixture(scope="module")
def clean_kv(tmp_path_factory, model_dirs, samples_path, smoke_config) -> Path:
    """Intact tiny KV datasets of tiny-scout and tiny-main (extracted once, copied per test)."""
    root = tmp_path_factory.mktemp("kv")
    for slug in ("tiny-scout", "tiny-main"):
        ex.extract(model_dirs[slug], samples_path, root / slug, EXTRACTION, smoke_config["prompt"], "cpu")
    return root


def flip_16_bytes(path: Path) -> None:
    """Invert 16 bytes in the middle of a file."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    """Cut a file to half its length."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def damaged_copy(clean: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    """A copy of both datasets with shard SHARD of the main model damaged; returns (scout, main) roots."""
    shutil.copytree(clean, tmp_path / "kv")
    damage(tmp_path / "kv" / "tiny-main" / SHARD)
    return tmp_path / "kv" / "tiny-scout", tmp_path / "kv" / "tiny-main"


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and SHARD in message and "rerun extraction" in message
    return message


@pytest.mark.parametrize("damage", [flip_16_bytes, truncate])
def test_structure_stage_names_the_damaged_shard(clean_kv, tmp_path, samples_path, smoke_config, damage):
    scout, main = damaged_copy(clean_kv, tmp_path, damage)
    cfg = smoke_config["structure"] | {"calibration_fraction": 0.5, "cv_folds": 2}
    with pytest.raises(KvpipeError) as info:
        analyse_pair(scout, main, read_passages(samples_path, main), "tiny", cfg)
    assert "SHA-256 does not match manifest.json" in _one_line(info)


@pytest.mark.parametrize("damage", [flip_16_bytes, truncate])
def test_projection_calibration_names_the_damaged_shard(clean_kv, tmp_path, samples_path, smoke_config, damage):
    scout, main = damaged_copy(clean_kv, tmp_path, damage)
    cal = Calibration.open(scout, main, read_passages(samples_path, main), "tiny", relative_depth(2, 3),
                           ("key", "value"), from_section(ProjectionSettings, smoke_config["projection"]))
    with pytest.raises(KvpipeError) as info:
        cal.statistics()
    _one_line(info)


def test_read_layer_and_read_shard_verify_and_a_missing_shard_is_named(clean_kv, tmp_path):
    _, main = damaged_copy(clean_kv, tmp_path, lambda path: path.unlink())
    with pytest.raises(KvpipeError, match=f"{SHARD}: missing shard file; rerun extraction"):
        kvstore.read_layer(main, 1)
    assert kvstore.read_layer(main, 0).num_rows == kvstore.load_manifest(main)["rows_per_layer"]


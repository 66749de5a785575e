"""The CUDA path (what a GPU workstation or SLURM job runs): every stage on the GPU agrees with the CPU run.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from kvpipe.kv import store as kvstore
from kvpipe.kv.extract import extract
from kvpipe.models.load import load_model
from kvpipe.projection.stage import run_projection
from kvpipe.selection.stage import run_selection

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FP32 = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 4, "compression": "zstd"}


@pytest.fixture(scope="module")
def kv(tmp_path_factory, model_dirs, samples_path, smoke_config):
    """Both tiny models' KV extracted on the CPU and on the GPU (float32), and the main's on the GPU in its auto dtype."""
    root = tmp_path_factory.mktemp("kv_cuda")
    out = {}
    for slug in ("tiny-scout", "tiny-main"):
        for device in ("cpu", "cuda"):
            out[slug, device] = root / device / slug
            extract(model_dirs[slug], samples_path, out[slug, device], FP32, smoke_config["prompt"], device, "s")
    out["tiny-main", "auto"] = root / "auto" / "tiny-main"
    extract(model_dirs["tiny-main"], samples_path, out["tiny-main", "auto"], FP32 | {"dtype": "auto", "storage_dtype": "float16"},
            smoke_config["prompt"], "cuda", "s")
    return out


def _matrix(root, layer: int, kind: str) -> np.ndarray:
    return kvstore.matrix(kvstore.read_layer(root, layer), kind)


def test_auto_dtype_on_cuda_is_bfloat16(model_dirs):
    lm = load_model(model_dirs["tiny-main"], "cuda", "auto")
    assert lm.device.type == "cuda" and lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).device.type == "cuda"


def test_extraction_on_cuda_equals_the_cpu_extraction(kv):
    for layer in range(3):
        for kind in ("key", "key_pre_rope", "value"):
            cpu, gpu = _matrix(kv["tiny-main", "cpu"], layer, kind), _matrix(kv["tiny-main", "cuda"], layer, kind)
            np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
            half = _matrix(kv["tiny-main", "auto"], layer, kind).astype(np.float32)
            assert np.isfinite(half).all()
            np.testing.assert_allclose(half, cpu, rtol=0.05, atol=0.05)   # bfloat16 compute, float16 storage


def test_selection_stage_on_cuda_gives_the_cpu_answers(tmp_path, model_dirs, samples_path, smoke_config):
    cfg, outs = smoke_config["selection"], {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        run_selection(model_dirs["tiny-scout"], model_dirs["tiny-main"], samples_path, "tiny", cfg, smoke_config["prompt"],
                      device, "float32", outs[device])
    key = ["sample_idx", "role", "method", "retention", "source"]
    cpu, gpu = (pd.read_parquet(outs[d] / "answers.parquet").sort_values(key).reset_index(drop=True) for d in outs)
    assert len(cpu) == len(gpu) > 0 and (cpu[key] == gpu[key]).all().all()
    assert (cpu["prediction"] == gpu["prediction"]).mean() >= 0.9   # greedy ties may flip a token between devices
    overlap = {d: pd.read_parquet(outs[d] / "overlap.parquet") for d in outs}
    assert np.allclose(overlap["cpu"]["overlap"].mean(), overlap["cuda"]["overlap"].mean(), atol=0.05)


def test_projection_stage_on_cuda_fits_injects_and_answers(tmp_path, kv, model_dirs, samples_path, smoke_config):
    cfg = smoke_config["projection"]
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        run_projection(kv["tiny-scout", device], kv["tiny-main", device], samples_path, model_dirs["tiny-scout"],
                       model_dirs["tiny-main"], "tiny", cfg, smoke_config["prompt"], device, "float32", outs[device])
    answers = {d: pd.read_parquet(outs[d] / "answers.parquet") for d in outs}
    assert len(answers["cuda"]) == len(answers["cpu"]) > 0
    assert set(answers["cuda"]["condition"]) == set(answers["cpu"]["condition"])
    metrics = {d: pd.read_parquet(outs[d] / "projector_metrics.parquet") for d in outs}
    ridge = {d: m.query("projector == 'ridge' and objective == 'reconstruction'")["value"].to_numpy(dtype=float)
             for d, m in metrics.items()}
    np.testing.assert_allclose(ridge["cuda"], ridge["cpu"], rtol=1e-2, atol=1e-3)   # closed form: device-independent
    assert np.isfinite(pd.read_parquet(outs["cuda"] / "ttft.parquet")["ttft_s"]).all()

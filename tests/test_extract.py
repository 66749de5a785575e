import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from kvpipe.data.prompt import build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.kv import extract as ex
from kvpipe.kv import store as kvstore
from kvpipe.models.rope import apply_rope, invert_rope, rope_tables

EXTRACTION = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 4, "compression": "zstd"}


@pytest.fixture(scope="module")
def kv_main(tmp_path_factory, model_dirs, samples_path, smoke_config):
    out = tmp_path_factory.mktemp("kv") / "tiny-main"
    manifest = ex.extract(model_dirs["tiny-main"], samples_path, out, EXTRACTION, smoke_config["prompt"], "cpu", "s")
    return out, manifest


def _plain_forward(lm, prompt, row):
    tokens = build_prompt(lm.tokenizer, prompt, row["context"], row["question"])
    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda m, i, o, l=l: captured.__setitem__(l, o.detach().clone())) for l, layer in enumerate(lm.model.model.layers)]
    with torch.no_grad():
        out = lm.model(torch.as_tensor(tokens.input_ids)[None], use_cache=True)
    for h in hooks:
        h.remove()
    return tokens, out.past_key_values, captured


def _rows(table, sample_idx, kind):
    return kvstore.matrix(table.filter(pd.Series(table.column("sample_idx").to_numpy() == sample_idx).values), kind)


def test_stored_kv_equals_past_key_values(kv_main, tiny_main, samples, smoke_config):
    root, manifest = kv_main
    hd, heads = manifest["head_dim"], manifest["num_kv_heads"]
    for layer in manifest["layers"]:
        table = kvstore.read_layer(root, layer)
        for _, row in samples.iterrows():
            tokens, cache, kproj = _plain_forward(tiny_main, smoke_config["prompt"], row)
            keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]
            as_rows = lambda t: t.transpose(0, 1).reshape(t.shape[1], -1).numpy()  # noqa: E731
            np.testing.assert_array_equal(_rows(table, row["sample_idx"], "key"), as_rows(keys))
            np.testing.assert_array_equal(_rows(table, row["sample_idx"], "value"), as_rows(values))
            # pre-RoPE keys are the k_proj output: the inverse rotation is exact
            pre = _rows(table, row["sample_idx"], "key_pre_rope")
            np.testing.assert_allclose(pre, kproj[layer][0].numpy(), rtol=1e-5, atol=1e-5)
            sel = table.filter(pd.Series(table.column("sample_idx").to_numpy() == row["sample_idx"]).values)
            assert sel.column("token_id").to_pylist() == tokens.input_ids.tolist()
            assert sel.column("position").to_pylist() == list(range(len(tokens)))
            assert sel.column("segment").to_pylist()[tokens.context_start] == "context"
    assert heads * hd == manifest["width"]


@pytest.mark.parametrize("fixture", ["tiny_main", "tiny_llama"])
def test_rope_inverse_then_apply_is_identity(fixture, request):
    lm = request.getfixturevalue(fixture)
    cos, sin = rope_tables(lm.model, torch.arange(300))
    keys = torch.randn(2, 300, cos.shape[-1]) * 5 + 3
    np.testing.assert_allclose(apply_rope(invert_rope(keys, cos, sin), cos, sin), keys, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(invert_rope(keys, cos, sin), keys)  # it does rotate
    np.testing.assert_allclose(invert_rope(apply_rope(keys, cos, sin), cos, sin), keys, rtol=1e-5, atol=1e-4)


def test_reapplying_rope_to_stored_pre_rope_keys_gives_cached_keys(kv_main, tiny_main):
    root, manifest = kv_main
    for layer in manifest["layers"]:
        table = kvstore.read_layer(root, layer)
        pos = torch.as_tensor(table.column("position").to_numpy().astype(np.int64))
        cos, sin = rope_tables(tiny_main.model, pos)
        shape = (len(pos), manifest["num_kv_heads"], manifest["head_dim"])
        pre = torch.from_numpy(kvstore.matrix(table, "key_pre_rope").copy()).reshape(shape)
        cached = kvstore.matrix(table, "key").reshape(shape)
        np.testing.assert_allclose(apply_rope(pre, cos[:, None], sin[:, None]).numpy(), cached, rtol=1e-5, atol=1e-5)
        assert not np.allclose(pre.numpy(), cached, atol=1e-3)


def test_read_shard_returns_one_sample_range(kv_main):
    root, manifest = kv_main
    second = kvstore.read_shard(root, 0, 1, columns=["sample_idx"])
    assert set(second.column("sample_idx").to_pylist()) == {4, 5}
    with pytest.raises(KvpipeError, match="shard-00009.parquet: not listed in .*manifest.json"):
        kvstore.read_shard(root, 0, 9)


def test_manifest_shards_and_hashes(kv_main, samples, tiny_main, smoke_config):
    root, manifest = kv_main
    lengths = [len(build_prompt(tiny_main.tokenizer, smoke_config["prompt"], r.context, r.question))
               for r in samples.itertuples()]
    assert manifest == json.loads((root / "manifest.json").read_text())
    assert not (root / kvstore.PARTIAL).exists()
    assert [s["samples"] for s in manifest["shards"]] == [[0, 4], [4, 6]]
    assert [s["rows"] for s in manifest["shards"]] == [sum(lengths[:4]), sum(lengths[4:])]
    assert manifest["rows_per_layer"] == sum(lengths) == kvstore.read_layer(root, 0).num_rows
    for shard in manifest["shards"]:
        assert len(shard["files"]) == manifest["num_layers"] == 3
        for rel, digest in shard["files"].items():
            assert kvstore.sha256_file(root / rel) == digest
            assert rel.startswith("layer=")
    assert manifest["key"]["model_fingerprint"] and manifest["key"]["code"]


def test_float16_storage_is_close_to_float32(tmp_path, kv_main, model_dirs, samples_path, smoke_config):
    root32, _ = kv_main
    ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION | {"storage_dtype": "float16"},
               smoke_config["prompt"], "cpu")
    t16, t32 = kvstore.read_layer(tmp_path, 2), kvstore.read_layer(root32, 2)
    assert t16.schema.field("key").type.value_type == "halffloat"
    for kind in kvstore.KINDS:
        np.testing.assert_allclose(kvstore.matrix(t16, kind), kvstore.matrix(t32, kind), rtol=2e-3, atol=1e-3)


def test_resume_after_crash_skips_verified_shards(tmp_path, model_dirs, samples_path, smoke_config, monkeypatch):
    calls = []
    real = ex.extract_sample

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated crash in shard 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "extract_sample", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION, smoke_config["prompt"], "cpu")
    assert not (tmp_path / "manifest.json").exists()
    progress = json.loads((tmp_path / kvstore.PARTIAL).read_text())
    assert [s["index"] for s in progress["shards"]] == [0]
    first = (tmp_path / kvstore.shard_file(0, 0)).stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(ex, "extract_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    manifest = ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION, smoke_config["prompt"], "cpu")
    assert len(calls) == 2  # only the two samples of shard 1 were recomputed
    assert (tmp_path / kvstore.shard_file(0, 0)).stat().st_mtime_ns == first
    assert len(manifest["shards"]) == 2


def test_corrupt_or_changed_inputs_are_recomputed(tmp_path, model_dirs, samples_path, smoke_config, monkeypatch):
    ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION, smoke_config["prompt"], "cpu")
    (tmp_path / "manifest.json").rename(tmp_path / kvstore.PARTIAL)  # as if the last step had not run
    (tmp_path / kvstore.shard_file(2, 1)).write_bytes(b"corrupt")
    calls = []
    real = ex.extract_sample
    monkeypatch.setattr(ex, "extract_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION, smoke_config["prompt"], "cpu")
    assert len(calls) == 2  # the shard with the corrupt file
    calls.clear()
    (tmp_path / "manifest.json").rename(tmp_path / kvstore.PARTIAL)
    ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION | {"layers": [0]}, smoke_config["prompt"], "cpu")
    assert len(calls) == 6  # other config: everything recomputed, stale layers removed
    assert sorted(p.parent.name for p in tmp_path.glob("layer=*/*.parquet")) == ["layer=00", "layer=00"]


def _hooked(monkeypatch, lm_dir, hook_module, fn):
    from kvpipe.models.load import load_model

    lm = load_model(lm_dir, "cpu", "float32")
    hook_module(lm.model).register_forward_hook(lambda m, i, o: fn(o))
    monkeypatch.setattr(ex, "load_model", lambda *a, **k: lm)


def test_non_finite_kv_names_model_layer_and_dtype(tmp_path, model_dirs, samples_path, smoke_config, monkeypatch):
    _hooked(monkeypatch, model_dirs["tiny-main"], lambda m: m.model.layers[1].self_attn.v_proj,
            lambda o: o.index_fill_(-1, torch.tensor([3]), float("inf")))
    with pytest.raises(KvpipeError, match="model tiny-main: .* non-finite values in values of layer 1 with dtype float32"):
        ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION | {"layers": [0, 1]}, smoke_config["prompt"],
                   "cpu")


def test_non_finite_logits_fail(tmp_path, model_dirs, samples_path, smoke_config, monkeypatch):
    _hooked(monkeypatch, model_dirs["tiny-main"], lambda m: m.lm_head, lambda o: o.mul_(float("nan")))
    with pytest.raises(KvpipeError, match="model tiny-main: .* non-finite values in the logits with dtype float32"):
        ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION, smoke_config["prompt"], "cpu")


def test_float16_storage_overflow_is_refused(tmp_path, model_dirs, samples_path, smoke_config, monkeypatch):
    _hooked(monkeypatch, model_dirs["tiny-main"], lambda m: m.model.layers[0].self_attn.v_proj, lambda o: o.mul_(1e7))
    with pytest.raises(KvpipeError, match="values of layer 0 exceeds the range of storage dtype float16"):
        ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION | {"storage_dtype": "float16"},
                   smoke_config["prompt"], "cpu")


def test_layers_out_of_range(tmp_path, model_dirs, samples_path, smoke_config):
    with pytest.raises(KvpipeError, match=r"extraction.layers: \[7\] out of range for model tiny-main with 3 layers"):
        ex.extract(model_dirs["tiny-main"], samples_path, tmp_path, EXTRACTION | {"layers": [0, 7]}, smoke_config["prompt"],
                   "cpu")


def test_a_prompt_longer_than_the_context_window_names_sample_and_model(tmp_path, model_dirs, samples_path, samples,
                                                                          smoke_config):
    small = tmp_path / "model"
    shutil.copytree(model_dirs["tiny-main"], small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(KvpipeError, match=rf"^sample {samples['id'][0]}: its prompt has \d+ tokens for model tiny-main, "
                                          r"whose context window is 16"):
        ex.extract(small, samples_path, tmp_path / "kv", EXTRACTION, smoke_config["prompt"], "cpu")
    assert not (tmp_path / "kv").exists()

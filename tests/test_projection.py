"""The projection stage on tiny models: projectors, injection, conditions, bytes, the stage's outputs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kvpipe.config import validate
from kvpipe.errors import KvpipeError
from kvpipe.inference.cache_sources import GivenTensors
from kvpipe.inference.session import Session
from kvpipe.io import read_json
from kvpipe.kv import extract as ex
from kvpipe.kv.pairs import read_passages
from kvpipe.projection import payload as pl
from kvpipe.projection.aggregate import VARIANT
from kvpipe.projection.answer import Answerer
from kvpipe.projection.calibration import Calibration
from kvpipe.projection.conditions import SampleInputs
from kvpipe.projection.fit import fit_all, kinds_of, main_means
from kvpipe.projection.fuser import fuser_start
from kvpipe.projection.gather import gather
from kvpipe.projection.hidden import HiddenMap
from kvpipe.projection.layer_map import LAYER_MAPS, best_cka, last_aligned, relative_depth
from kvpipe.projection.registry import CONDITIONS, PROJECTORS, plan_all
from kvpipe.projection.stage import ANSWERING, FIT_TIMINGS, answer_chunk, fit_projection, run_projection
from kvpipe.settings import ProjectionSettings, from_section

EXTRACTION = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 4, "compression": "none"}
ANSWER_COLUMNS = {"sample_idx", "sample_id", "passage", "is_impossible", "condition", "projector", "objective", "key_map",
                  "retention", "rank", "bottom_layers", "hidden_layer", "reply", "prediction", "exact", "f1", "abstained",
                  "empty", "bytes", "n_context", "n_tokens"}


@pytest.fixture(scope="module")
def kv_dirs(tmp_path_factory, model_dirs, samples_path, smoke_config):
    root = tmp_path_factory.mktemp("kvs")
    for slug in ("tiny-scout", "tiny-main"):
        ex.extract(model_dirs[slug], samples_path, root / slug, EXTRACTION, smoke_config["prompt"], "cpu")
    ex.extract(model_dirs["tiny-main"], samples_path, root / "tiny-main-by2", EXTRACTION | {"shard_size": 2},
               smoke_config["prompt"], "cpu")
    return root


@pytest.fixture(scope="module")
def stage_out(tmp_path_factory, kv_dirs, model_dirs, samples_path, smoke_config):
    out = tmp_path_factory.mktemp("projection")
    run_projection(kv_dirs / "tiny-scout", kv_dirs / "tiny-main", samples_path, model_dirs["tiny-scout"],
                   model_dirs["tiny-main"], "tiny", smoke_config["projection"], smoke_config["prompt"], "cpu", "float32",
                   out)
    return out


@pytest.mark.slow
def test_stage_writes_every_table_named_as_the_issue_names_them(stage_out, smoke_config):
    answers = pd.read_parquet(stage_out / "answers.parquet")
    assert ANSWER_COLUMNS <= set(answers.columns)
    assert set(answers["condition"]) == set(CONDITIONS) == set(smoke_config["projection"]["conditions"])
    facts = read_json(stage_out / "facts.json")
    assert len(answers) == facts["n_test_samples"] * answers.groupby("sample_idx").size().iloc[0]
    metrics = pd.read_parquet(stage_out / "projector_metrics.parquet")
    assert {"cosine", "rel_error", "r2"} == set(metrics["metric"])
    assert set(metrics["projector"]) == {"mean", *smoke_config["projection"]["projectors"]}
    base = metrics[(metrics["projector"] == "mean") & (metrics["metric"] == "r2")]
    assert np.allclose(base["value"], 0, atol=1e-9)   # R² is skill over the calibration mean
    for name in smoke_config["projection"]["projectors"]:
        for objective in smoke_config["projection"]["objectives"]:
            card = read_json(stage_out / "projectors" / f"{name}-{objective}.json")
            tensors = load_file(str(stage_out / "projectors" / f"{name}-{objective}.safetensors"))
            assert card["params"] == sum(t.numel() for t in tensors.values()) > 0
            assert card["pair"] == "tiny" and card["fit_data_sha256"] and card["layer_map"]["name"] == "relative_depth"
            assert np.isfinite(card["calibration_error"]) and np.isfinite(card["validation_error"])
    # every measured second is in the timing files: ttft_samples null times every row of every test sample
    ttft = pd.read_parquet(stage_out / "ttft.parquet")
    modelled = answers[answers["condition"] != "always_abstain"]   # a constant reply has no time to first token
    assert len(ttft) == len(modelled) and (ttft["question_s"] > 0).all() and (ttft[["build_s", "scout_s"]] >= 0).all().all()
    assert ttft.merge(modelled, on=["sample_idx", *VARIANT], validate="one_to_one").shape[0] == len(modelled)
    parts = ttft.set_index("condition")
    assert (parts.loc["projected_kv", "scout_s"] > 0).all() and (parts.loc["main_full", "scout_s"] == 0).all()
    assert (parts.loc["main_full", "own_prefill_s"] > 0).all() and (parts.loc["no_context", "own_prefill_s"] == 0).all()
    abstain = answers[answers["condition"] == "always_abstain"]
    assert (abstain["reply"] == "unanswerable").all() and abstain["abstained"].all() and not abstain["empty"].any()
    assert (answers.loc[answers["condition"] == "no_context", "n_tokens"] == facts["n_template_tokens"]).all()
    timing = read_json(stage_out / "timings.json")
    assert set(timing["fit_s"]) == {f"{p}/{o}" for p in smoke_config["projection"]["projectors"]
                                    for o in smoke_config["projection"]["objectives"]} | {"gated/next_token"}  # fused's
    fuser = read_json(stage_out / "projectors" / "fuser-next_token.json")
    assert fuser["errors"]["next_token"]["steps"] == smoke_config["projection"]["distill"]["steps"]
    assert timing["fit_peak_mib"]["gated/next_token"] > 0 and not (stage_out / "checkpoints").exists()
    assert "fit_s" not in json.dumps(facts) and not any(c.endswith("_s") for c in answers.columns)


# --- projectors fitted on a model paired with itself -------------------------------------------------

@pytest.fixture(scope="module")
def self_fit(kv_dirs, samples_path, smoke_config, tiny_main):
    cfg = from_section(ProjectionSettings, smoke_config["projection"] | {"alpha_grid": [1e-9], "objectives": ["reconstruction"]})
    passages = read_passages(samples_path, kv_dirs / "tiny-main")
    cal = Calibration.open(kv_dirs / "tiny-main", kv_dirs / "tiny-main", passages, "self", relative_depth(3, 3),
                           ("key", "value", "key_post"), cfg)
    stats = cal.statistics()
    return cal, stats, fit_all(cal, stats, cfg, tiny_main, None), cfg


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_every_projector_fitted_on_a_model_paired_with_itself_is_the_identity(self_fit, name, tmp_path):
    cal, _, fitted, cfg = self_fit
    f = fitted[(name, "reconstruction")]
    assert set(f.projector.kinds) == set(kinds_of(name, cfg))
    for kind, err in f.errors.items():
        assert err["calibration"] < 1e-4 and err["validation"] < 1e-3, (kind, err)
    x = torch.randn(5, cal.widths[0])
    for j in range(len(cal.layer_map)):
        for kind in f.projector.kinds:
            assert torch.allclose(f.projector(j, kind, x), x, atol=0.05 * x.abs().max())
    # the saved tensors rebuild the same projector
    clone = PROJECTORS[name](len(cal.layer_map), f.projector.kinds, *cal.widths, cfg)
    clone.load_state_dict({k: v.clone() for k, v in f.projector.state_dict().items()})
    assert torch.equal(clone(1, "value", x), f.projector(1, "value", x))
    assert f.projector.n_params() > 0 and f.projector.n_bytes() == 4 * f.projector.n_params()


def test_statistics_do_not_depend_on_the_sharding(self_fit, kv_dirs, samples_path):
    cal, stats, _, cfg = self_fit
    by2 = Calibration.open(kv_dirs / "tiny-main-by2", kv_dirs / "tiny-main-by2",
                           read_passages(samples_path, kv_dirs / "tiny-main-by2"), "self", cal.layer_map,
                           cal.kinds, cfg).statistics()
    for key, s in stats.items():
        assert by2[key].n == s.n and np.allclose(by2[key].sxy, s.sxy) and np.allclose(by2[key].sxx, s.sxx)


def identity_hidden(lm, layer=0):
    """The identity map of a model's hidden states onto themselves, entering `layer`."""
    width = lm.model.config.hidden_size
    return HiddenMap(layer, layer, torch.eye(width), torch.zeros(width))


def _answerer(self_fit, tiny_main, smoke_config, conditions, projectors=None):
    cal, stats, fitted, cfg = self_fit
    chosen = {k: f.projector.eval() for k, f in fitted.items() if projectors is None or k[0] in projectors}
    common = {"projectors": chosen, "layer_map": cal.layer_map, "means": main_means(stats, cal),
              "extras": {"hidden": (tiny_main, identity_hidden(tiny_main)),
                         "fuser": fuser_start(fitted[("gated", "reconstruction")].projector).eval()}}
    return Answerer(tiny_main, tiny_main, common, dataclasses.replace(cfg, conditions=conditions),
                    smoke_config["prompt"], "self")


@pytest.mark.slow
def test_identity_projection_reproduces_the_main_answers_token_for_token(self_fit, tiny_main, smoke_config, samples):
    answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full", "projected_kv", "chain"])
    for row in samples.itertuples(index=False):
        records, ttft, _ = answerer.sample(row, ttft=False)
        assert ttft == []
        table = pd.DataFrame(records)
        full = table.loc[table["condition"] == "main_full", "prediction"].item()
        projected = table[(table["condition"] == "projected_kv") & (table["key_map"] == "pre_rope")]
        assert (projected["prediction"] == full).all(), projected[["projector", "prediction"]]
        whole = table[(table["condition"] == "chain") & (table["retention"] == 1.0) & (table["rank"] == -1)]
        assert whole["prediction"].item() == full


def _inputs(self_fit, tiny_main, smoke_config, row, tokens=None):
    answerer = _answerer(self_fit, tiny_main, smoke_config, list(CONDITIONS))
    tokens = answerer.prompt_tokens(row) if tokens is None else tokens
    payload, selections = answerer.scout_side(tokens, row.sample_idx)
    session = Session(tiny_main, tokens, 1)
    c = answerer.common
    return SampleInputs(tokens, row.context, payload, session.own, c["projectors"], c["layer_map"], tiny_main,
                        c["means"], selections, answerer.cfg, extras=c["extras"]), session


def test_chain_at_full_retention_and_rank_sends_exactly_the_projected_cache(self_fit, tiny_main, smoke_config, samples):
    s, _ = _inputs(self_fit, tiny_main, smoke_config, next(samples.itertuples(index=False)))
    whole = s.payload.truncated(np.arange(len(s.payload)), None)
    chain, direct = s.projected("ridge", "reconstruction", payload=whole), s.projected("ridge", "reconstruction")
    assert all(torch.equal(a, b) for a, b in zip(chain.keys + chain.values, direct.keys + direct.values))
    low = s.payload.truncated(np.arange(len(s.payload)), 2)
    assert not torch.equal(low.values[0], s.payload.values[0])
    assert torch.linalg.matrix_rank(low.values[0]).item() <= 2


@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_every_condition_plans_rows_the_main_model_accepts(self_fit, tiny_main, smoke_config, samples, name):
    s, _ = _inputs(self_fit, tiny_main, smoke_config, next(samples.itertuples(index=False)))
    plans = CONDITIONS[name]().plans(s)
    assert plans and all(p.variant.condition == name for p in plans)
    assert len({p.variant.label for p in plans}) == len(plans)
    for p in plans:
        assert isinstance(p.bytes, int) and p.bytes >= 0
        if p.selection is not None and len(p.selection):
            assert p.selection.ndim == 1 and p.selection.max() < s.n_context
        if p.build is not None:
            kv = GivenTensors(p.build()).context_kv(tiny_main, s.tokens)
            assert len(kv) == s.tokens.context_end


def test_mean_kv_ignores_the_context(self_fit, tiny_main, smoke_config, samples):
    row = next(samples.itertuples(index=False))
    s, session = _inputs(self_fit, tiny_main, smoke_config, row)
    t = s.tokens
    ids = t.input_ids.copy()
    rng = np.random.default_rng(0)
    ids[t.context_start:t.context_end] = rng.integers(10, 200, t.context_end - t.context_start)
    other_tokens = dataclasses.replace(t, input_ids=ids)
    other, other_session = _inputs(self_fit, tiny_main, smoke_config, row, other_tokens)
    assert not torch.equal(session.own.values[0], other_session.own.values[0])   # the context did change
    answers = []
    for inputs, sess in ((s, session), (other, other_session)):
        (plan,) = CONDITIONS["mean_kv"]().plans(inputs)
        sess.add(GivenTensors(plan.build()), "mean")
        answers.append(sess.answer([__import__("kvpipe.inference.requests", fromlist=["AnswerRequest"]).AnswerRequest(
            "mean", cache="mean")], 6)[0].token_ids)
    assert answers[0] == answers[1]


def test_given_caches_keep_the_main_own_template_rows(self_fit, tiny_main, smoke_config, samples):
    """mean_kv (and every given cache) replaces only the context positions: the template rows are the main's own
    prefill, tensor for tensor; the context rows are the calibration mean."""
    s, session = _inputs(self_fit, tiny_main, smoke_config, next(samples.itertuples(index=False)))
    t = s.tokens.context_start
    (plan,) = CONDITIONS["mean_kv"]().plans(s)
    kv = plan.build()
    for own, given in ((session.own.keys, kv.keys), (session.own.values, kv.values)):
        for layer in range(len(own)):
            assert torch.equal(given[layer][:, :t], own[layer][:, :t])
            assert not torch.equal(given[layer][:, t:], own[layer][:, t:])
    heads = kv.values[0].shape[0]
    mean_value = s.means["value"][0].reshape(heads, -1)
    assert torch.allclose(kv.values[0][:, t:], mean_value[:, None].expand(-1, s.n_context, -1))
    projected = s.projected("ridge", "reconstruction")
    assert torch.equal(projected.keys[1][:, :t], session.own.keys[1][:, :t])


def test_bytes_are_counted_from_the_shapes_sent(self_fit, tiny_main, smoke_config, samples):
    s, _ = _inputs(self_fit, tiny_main, smoke_config, next(samples.itertuples(index=False)))
    plans = {p.variant.label: p for p in plan_all(s, list(CONDITIONS))}
    n, widths = s.n_context, s.widths   # context rows only: the template is the main's own
    assert widths == [s.payload.values[j].shape[1] for j in sorted(set(s.layer_map))]
    by = {(p.variant.condition, p.variant.projector, p.variant.key_map, p.variant.retention, p.variant.rank): p.bytes
          for p in plans.values()}
    assert by[("projected_kv", "ridge", "pre_rope", 1.0, -1)] == 2 * n * sum(widths) * 2
    assert by[("projected_k_own_v", "ridge", "pre_rope", 1.0, -1)] == n * sum(widths) * 2
    assert by[("main_full", "none", "none", 1.0, -1)] == len(s.context.encode("utf-8"))
    sel = s.selections[0.5]
    kept = len(sel)
    index = min((s.n_context + 7) // 8, pl.varint_bytes(np.diff(sel, prepend=0)))
    assert by[("chain", "ridge", "pre_rope", 0.5, 2)] == 2 * sum(min(kept * w, 2 * (kept + w)) * 2 for w in widths) + index
    assert by[("scout_selection", "none", "none", 0.5, -1)] == len(s.context.encode("utf-8")) + index
    assert by[("mean_kv", "none", "none", 1.0, -1)] == 0
    assert by[("fused", "gated", "pre_rope", 1.0, -1)] == len(s.context.encode("utf-8")) + 2 * n * sum(widths) * 2
    above = {p.variant.bottom_layers: p.bytes - len(s.context.encode("utf-8")) for p in plans.values()
             if p.variant.condition == "own_bottom_projected_top"}
    sent = {b: {s.layer_map[j] for j in range(b, len(s.layer_map))} for b in above}   # each scout layer sent once
    assert above and all(nbytes == 2 * n * sum(s.payload.values[j].shape[1] for j in sent[b]) * 2
                         for b, nbytes in above.items())


def test_payload_encodings():
    assert pl.varint_bytes(np.array([0, 127, 128, 16383, 16384])) == 1 + 1 + 2 + 2 + 3
    dense = np.arange(100)
    assert pl.index_bytes(dense, 100) == 13            # a bitmap beats 100 one-byte deltas
    sparse = np.array([5, 900, 1900])
    assert pl.index_bytes(sparse, 2000) == 1 + 2 + 2   # deltas 5, 895, 1000 beat a 250-byte bitmap
    assert pl.matrix_bytes(100, 64) == 12800 and pl.matrix_bytes(100, 64, 8) == 8 * 164 * 2
    assert pl.matrix_bytes(100, 64, 64) == 12800       # factors larger than the matrix: send the matrix
    assert pl.kv_bytes(10, [64, 64]) == 2 * 2 * 10 * 64 * 2


def test_layer_maps():
    assert relative_depth(24, 28)[0] == 0 and relative_depth(24, 28)[-1] == 23 and len(relative_depth(24, 28)) == 28
    assert last_aligned(24, 28) == [0] * 5 + list(range(1, 24))
    assert last_aligned(3, 2) == [1, 2]
    planted = pd.DataFrame([{"metric": "cka_debiased", "kind": kind, "scout_layer": s, "main_layer": m,
                             "value": 1.0 if s == (2 - m) else 0.1} for kind in ("key_pre_rope", "value")
                            for s in range(3) for m in range(3)])
    assert best_cka(3, 3, planted) == [2, 1, 0]
    with pytest.raises(KvpipeError, match="best_cka"):
        best_cka(3, 3, None)
    assert set(LAYER_MAPS) == {"relative_depth", "last_aligned", "best_cka"}


@pytest.mark.slow  # a 30-step attention fit
def test_attention_objective_lowers_the_attention_loss(self_fit, tiny_main, smoke_config, samples):
    from kvpipe.projection.attention import attention_loss, collect, fine_tune

    cal, _, fitted, cfg = self_fit
    answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full"])
    data = [collect(tiny_main, tiny_main, answerer.prompt_tokens(r)) for r in samples.head(3).itertuples(index=False)]
    projector = PROJECTORS["ridge"](len(cal.layer_map), ("key", "value"), *cal.widths, cfg)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for kind in ("key", "value"):
            shape = projector.weight[kind].shape
            projector.weight[kind].copy_(torch.eye(cal.widths[0]) + 0.3 * torch.randn(*shape, generator=noise))
    before = float(attention_loss(projector, data[2], cal.layer_map, tiny_main).detach())
    losses = fine_tune(projector, data[:2], data[2:], cal.layer_map, tiny_main,
                       dataclasses.replace(cfg.attention, steps=30, lr=1e-2, eval_every=5), 0)
    assert losses["validation"] < before / 4   # seeded: 3.94 -> 0.38 on the held-out sample; a stalled fit fails


@pytest.mark.parametrize(("edit", "message"), [
    ({"conditions": ["projected_kv"]}, "projection.conditions: must include main_full"),
    ({"chain": {"projector": "mlp"}, "projectors": ["ridge"]}, "projection.chain.projector: 'mlp' is not fitted"),
    ({"objectives": ["reconstruction"], "chain": {"objective": "attention"}}, "projection.chain.objective"),
])
def test_projection_config_cross_references(smoke_config, edit, message):
    config = dict(smoke_config)
    config["projection"] = {**smoke_config["projection"], **edit,
                            "chain": {**smoke_config["projection"]["chain"], **edit.get("chain", {})}}
    with pytest.raises(KvpipeError, match=message):
        validate(config)


def test_max_test_samples_answers_whole_test_passages_only(tmp_path, kv_dirs, model_dirs, samples_path, smoke_config):
    cfg = smoke_config["projection"] | {"projectors": ["ridge"], "objectives": ["reconstruction"],
                                        "conditions": ["main_full", "mean_kv"], "max_test_samples": 1, "ttft_samples": 0}
    run_projection(kv_dirs / "tiny-scout", kv_dirs / "tiny-main", samples_path, model_dirs["tiny-scout"],
                   model_dirs["tiny-main"], "tiny", cfg, smoke_config["prompt"], "cpu", "float32", tmp_path)
    answers = pd.read_parquet(tmp_path / "answers.parquet")
    facts = read_json(tmp_path / "facts.json")
    assert answers["passage"].nunique() == 1 and facts["n_test_samples"] == answers["sample_idx"].nunique()
    assert facts["n_test_passages"] == 1 and pd.read_parquet(tmp_path / "ttft.parquet").empty


def test_the_scout_selects_with_any_registered_method(self_fit, tiny_main, smoke_config, samples):
    """projection.chain.method: random gives the seeded uniform scores' top k at each budget, unlike Q2C's."""
    from kvpipe.data.prompt import build_prompt
    from kvpipe.scoring.methods import top_n
    from kvpipe.scoring.select import context_budget

    row = samples.iloc[0]
    tokens = build_prompt(tiny_main.tokenizer, smoke_config["prompt"], row["context"], row["question"])
    n, seed = tokens.context_end - tokens.context_start, self_fit[3].seed
    chosen = {}
    for method in ("q2c", "random"):
        answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full"])
        answerer = Answerer(tiny_main, tiny_main, answerer.common, dataclasses.replace(answerer.cfg, chain=dataclasses.replace(
            answerer.cfg.chain, method=method)), smoke_config["prompt"], "self")
        chosen[method] = answerer.scout_side(tokens, int(row["sample_idx"]))[1]
    uniform = np.random.default_rng([seed, int(row["sample_idx"])]).random(n)
    assert chosen["random"].keys() == chosen["q2c"].keys() and chosen["random"]
    for r, sel in chosen["random"].items():
        k = context_budget(r, n, tokens.context_start, smoke_config["projection"]["budget"])
        assert np.array_equal(sel, top_n(uniform, k))
    assert any(not np.array_equal(chosen["random"][r], chosen["q2c"][r]) for r in chosen["q2c"])


@pytest.mark.slow
def test_answering_chunks_gathered_equal_the_whole_run_byte_for_byte(tmp_path, kv_dirs, model_dirs, samples_path,
                                                                      smoke_config):
    """One fit, then the test samples answered in two chunks of the sample table ([0, 4) and [4, 6)) and gathered:
    the answers are the whole run's byte for byte; TTFT covers the first test sample only, wherever its chunk."""
    cfg = smoke_config["projection"] | {"projectors": ["ridge"], "objectives": ["reconstruction"],
                                        "conditions": ["main_full", "projected_kv", "always_abstain"], "ttft_samples": 1}
    args = (model_dirs["tiny-scout"], model_dirs["tiny-main"], "tiny", cfg, smoke_config["prompt"], "cpu", "float32")
    kv = (kv_dirs / "tiny-scout", kv_dirs / "tiny-main", samples_path)
    run_projection(*kv, *args, tmp_path / "whole")
    fit_projection(*kv, *args, tmp_path / "fit")
    table = pd.read_parquet(samples_path)
    chunks = []
    for first, end in ((0, 4), (4, 6)):
        table.iloc[first:end].to_parquet(tmp_path / f"chunk{first}.parquet")
        chunks.append(tmp_path / "fit" / "chunks" / str(first))
        answer_chunk(tmp_path / "fit" / ANSWERING, tmp_path / f"chunk{first}.parquet", *args, chunks[-1])
    assert all(len(pd.read_parquet(c / "answers.parquet")) for c in chunks)   # both chunks hold test samples
    gather(chunks, tmp_path / "fit" / FIT_TIMINGS, tmp_path / "fit")
    for name in ("answers.parquet", "projector_metrics.parquet", "facts.json"):
        assert (tmp_path / "fit" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    ttft = pd.read_parquet(tmp_path / "fit" / "ttft.parquet")
    assert ttft["sample_idx"].nunique() == 1 and len(ttft) == len(pd.read_parquet(tmp_path / "whole" / "ttft.parquet"))
    assert set(read_json(tmp_path / "fit" / "timings.json")["phases"]) == {"statistics_s", "attention_data_s", "fit_s",
                                                                           "metrics_s", "answers_s"}

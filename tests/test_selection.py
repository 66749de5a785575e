import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvpipe.data.prompt import QUESTION, build_prompt
from kvpipe.data.qa_metrics import squad_exact, squad_f1
from kvpipe.errors import KvpipeError
from kvpipe.inference.session import Session
from kvpipe.selection.methods import Q2C, Random, ScoringInputs, SnapKV, build_methods, top_k
from kvpipe.selection.report import aggregate, summary_markdown
from kvpipe.selection.stage import overlap_row, run_pair, score_prediction


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("The Cat!", ["cat"], 1.0, 1.0),
    ("in the 10th century", ["10th and 11th centuries", "10th century"], 0.0, 0.8),
    ("", [], 1.0, 1.0),
    ("France", [], 0.0, 0.0),
    ("a b c", ["x y"], 0.0, 0.0),
])
def test_squad_metrics_follow_the_official_normalisation(pred, golds, em, f1):
    assert squad_exact(pred, golds) == em
    assert squad_f1(pred, golds) == pytest.approx(f1)


def test_unanswerable_reply_scores_as_empty_answer():
    assert score_prediction("Unanswerable.\nmore", [])[1:] == (1.0, 1.0)
    assert score_prediction("Paris\nis big", [{"text": "Paris", "answer_start": 0}]) == ("Paris", 1.0, 1.0)


def test_top_k_and_overlap_expectations():
    scores = np.array([0.1, 0.9, 0.9, 0.5, np.inf])
    assert top_k(scores, 0.4).tolist() == [1, 4]          # ties: earlier position wins
    assert top_k(scores, 0.6).tolist() == [1, 2, 4]
    assert top_k(scores, 0.01).tolist() == [4]            # at least one token
    row = overlap_row(np.arange(10), np.arange(5, 15), 40)
    assert row["overlap"] == 0.5 and row["jaccard"] == pytest.approx(5 / 15)
    assert row["overlap_random"] == pytest.approx(10 / 40)


def _eager(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def session(tiny_main, samples, smoke_config):
    row = samples.iloc[0]
    tokens = build_prompt(tiny_main.tokenizer, smoke_config["prompt"], row["context"], row["question"])
    s = Session(tiny_main, tokens, window=16)
    n_ctx = tokens.context_end - tokens.context_start
    (full,) = s.answer([np.arange(n_ctx)], 8, capture_row=0)
    return s, full


def _inputs(s):
    return ScoringInputs(s.context, 0, s.window_queries, s.window_index, s.question_queries, s.question_index,
                         s.question_keys)


def test_q2c_equals_attention_of_a_full_forward(session, model_dirs):
    s, _ = session
    with torch.no_grad():
        out = _eager(model_dirs["tiny-main"])(torch.as_tensor(s.tokens.input_ids)[None], output_attentions=True)
    rows = np.flatnonzero(s.tokens.segment == QUESTION)
    naive = sum(a[0][:, rows][:, :, s.context].sum(1).mean(0) for a in out.attentions).numpy()
    np.testing.assert_allclose(Q2C().score(_inputs(s)), naive, rtol=1e-4, atol=1e-6)


def test_snapkv_equals_pooled_window_attention_of_the_prefill(session, model_dirs):
    s, _ = session
    ctx_end = s.tokens.context_end
    with torch.no_grad():
        out = _eager(model_dirs["tiny-main"])(torch.as_tensor(s.tokens.input_ids[:ctx_end])[None], output_attentions=True)
    w, k = 16, 5
    method = SnapKV(window=w, kernel=k, pooling="avg", head_reduce="mean", keep_window=True)
    naive = 0
    for a in out.attentions:
        col = a[0][:, ctx_end - w:, s.context.start:ctx_end - w].sum(1).mean(0)
        padded = torch.nn.functional.pad(col[None, None], (k // 2, k // 2), mode="replicate")
        naive = naive + torch.nn.functional.avg_pool1d(padded, k, stride=1)[0, 0]
    got = method.score(_inputs(s))
    np.testing.assert_allclose(got[:-w], naive.numpy(), rtol=1e-4, atol=1e-6)
    assert np.isinf(got[-w:]).all()


def test_random_selection_is_seeded_per_sample_and_shared_by_models(session):
    s, _ = session
    inputs = _inputs(s)
    assert np.array_equal(Random(3).score(inputs), Random(3).score(inputs))
    assert not np.array_equal(Random(3).score(inputs), Random(4).score(inputs))


def test_full_retention_answer_equals_plain_generate(session, tiny_main):
    s, full = session
    ids = torch.as_tensor(s.tokens.input_ids)[None]
    with torch.no_grad():
        plain = tiny_main.model.generate(ids, max_new_tokens=8, do_sample=False,
                                         eos_token_id=tiny_main.tokenizer.eos_token_id, pad_token_id=0)
    expected = [t for t in plain[0, ids.shape[1]:].tolist() if t != tiny_main.tokenizer.eos_token_id]
    assert full.token_ids == expected and len(expected) > 0


def test_cache_holds_kept_plus_question_plus_generated_tokens(session):
    s, _ = session
    n_ctx = s.context.stop - s.context.start
    sel = top_k(np.arange(n_ctx, dtype=float), 0.5)
    (ans,) = s.answer([sel], 5)
    n_question_part = len(s.tokens) - s.tokens.context_end
    # the last generated token is emitted but never fed back, unless generation stopped at EOS earlier
    assert ans.kept == s.tokens.context_start + len(sel)
    assert ans.cache_length == ans.kept + n_question_part + len(ans.token_ids) - 1
    assert s.cache.get_seq_length() == s.tokens.context_end  # the prefilled cache itself is never modified


def test_batched_conditions_equal_one_at_a_time(session):
    s, _ = session
    n_ctx = s.context.stop - s.context.start
    rng = np.random.default_rng(0)
    sels = [np.sort(rng.choice(n_ctx, k, replace=False)) for k in (n_ctx // 4, n_ctx // 2, n_ctx)]
    batched = s.answer(sels, 6)
    single = [s.answer([sel], 6)[0] for sel in sels]
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]


def test_evicted_tokens_cannot_leak_into_the_question(tiny_main, samples, smoke_config):
    """Evict the last context tokens (no kept token attended to them) and change their ids.

    The question tokens' layer-1 keys depend on everything the question attended to at
    layer 0: they must not change when only evicted tokens change. With the tokens kept,
    or with the question prefilled over the full context, they would.
    """
    row = samples.iloc[0]
    tokens = build_prompt(tiny_main.tokenizer, smoke_config["prompt"], row["context"], row["question"])
    n_ctx = tokens.context_end - tokens.context_start
    evicted = np.arange(tokens.context_end - 5, tokens.context_end)
    altered = dataclasses.replace(tokens, input_ids=tokens.input_ids.copy())
    altered.input_ids[evicted] = (altered.input_ids[evicted] + 7) % len(tiny_main.tokenizer)
    nq = len(tokens) - tokens.context_end

    def question_keys(toks, keep):
        s = Session(tiny_main, toks, window=8)
        s.answer([keep], 2, capture_row=0)
        return s.question_keys[1][..., -nq:, :]

    pruned = np.arange(n_ctx - 5)
    assert torch.equal(question_keys(tokens, pruned), question_keys(altered, pruned))
    everything = np.arange(n_ctx)
    assert not torch.allclose(question_keys(tokens, everything), question_keys(altered, everything))


def test_rerotation_keeps_full_context_answers_and_runs_pruned(session):
    s, full = session
    n_ctx = s.context.stop - s.context.start
    rerotated = s.answer([np.arange(n_ctx), top_k(np.arange(n_ctx, dtype=float), 0.25)], 8, rerotate=True)
    assert rerotated[0].token_ids == full.token_ids
    assert rerotated[1].kept == s.tokens.context_start + len(top_k(np.arange(n_ctx, dtype=float), 0.25))


def test_pair_run_covers_every_condition(model_dirs, samples, smoke_config):
    cfg = smoke_config["selection"] | {"retention": [0.5, 1.0], "max_new_tokens": 3}
    answers, overlaps, timings = run_pair({"scout": model_dirs["tiny-scout"], "main": model_dirs["tiny-main"]},
                                          samples.head(2), "tiny", cfg, smoke_config["prompt"], "cpu", "float32")
    per_sample = answers.groupby(["role", "method", "retention", "source"]).size()
    assert (per_sample == 2).all()
    for role in ("scout", "main"):
        assert per_sample.loc[(role, "full", 1.0, "none")] == 2
        for m in ("q2c", "snapkv"):
            for src in ("own", "transfer"):
                assert per_sample.loc[(role, m, 0.5, src)] == 2
        assert per_sample.loc[(role, "random", 0.5, "own")] == 2
    full = answers[answers["retention"] == 1.0].groupby(["sample_idx", "role"])["prediction"].nunique()
    assert (full == 1).all()   # at retention 1 every condition is the full-KV answer
    pruned = answers[answers["retention"] == 0.5]
    assert (pruned["n_kept_context"] == (pruned["n_context"] * 0.5).round()).all()
    assert set(overlaps["method"]) == {"q2c", "snapkv", "random"}
    assert (overlaps.loc[overlaps["method"] == "random", "overlap"] == 1.0).all()
    assert {"prefill_s", "pruned_answers_s"} <= set(timings.columns)


def test_pair_with_different_tokenizers_is_rejected(model_dirs, samples, smoke_config):
    with pytest.raises(KvpipeError, match="tokenise sample .* differently"):
        run_pair({"scout": model_dirs["tiny-llama"], "main": model_dirs["tiny-main"]}, samples.head(1), "mixed",
                 smoke_config["selection"], smoke_config["prompt"], "cpu", "float32")


def test_methods_from_config(smoke_config):
    methods = build_methods(smoke_config["selection"] | {"snapkv": {"preset": "kvpress", "kernel": 3}})
    snap = [m for m in methods if m.name == "snapkv"][0]
    assert (snap.window, snap.kernel, snap.pooling) == (64, 3, "avg")
    assert [m.name for m in methods] == ["q2c", "snapkv", "random"]


def test_per_head_selection_with_identical_heads_equals_shared(session, tiny_main):
    s, _ = session
    n_ctx = s.context.stop - s.context.start
    shared = top_k(np.random.default_rng(1).random(n_ctx), 0.5)
    layers, heads = tiny_main.card["num_layers"], tiny_main.card["num_kv_heads"]
    per_head = np.broadcast_to(shared, (layers, heads, len(shared))).copy()
    a_shared, a_heads = s.answer([shared, per_head], 6)
    assert a_shared.token_ids == a_heads.token_ids and a_shared.kept == a_heads.kept


def test_per_head_scores_reduce_to_the_shared_scores(session):
    s, _ = session
    inputs = _inputs(s)
    for method in (Q2C(), SnapKV(window=16, kernel=5, pooling="max"), Random(0)):
        heads = method.head_scores(inputs)
        assert heads.shape[:2] == (len(s.question_keys), s.question_keys[0].shape[0])
        np.testing.assert_allclose(method.score(inputs), method.reduce_heads(heads).sum(0))
    sel = top_k(Q2C().head_scores(inputs), 0.25)
    assert sel.shape[-1] == round(0.25 * (s.context.stop - s.context.start))
    assert not all(np.array_equal(sel[0, 0], sel[l, h]) for l in range(sel.shape[0]) for h in range(sel.shape[1]))
    (ans,) = s.answer([sel], 4)
    assert ans.kept == s.tokens.context_start + sel.shape[-1]


def test_pair_run_with_per_head_conditions(model_dirs, samples, smoke_config):
    cfg = smoke_config["selection"] | {"retention": [0.5], "max_new_tokens": 2, "per_head": True}
    answers, overlaps, timings = run_pair({"scout": model_dirs["tiny-scout"], "main": model_dirs["tiny-main"]},
                                          samples.head(2), "tiny", cfg, smoke_config["prompt"], "cpu", "float32")
    per_head = answers[answers["source"] == "own_per_head"]
    assert set(per_head["method"]) == {"q2c", "snapkv"} and set(per_head["role"]) == {"scout", "main"}
    assert set(answers["retention"]) == {0.5, 1.0}
    assert set(answers.loc[answers["retention"] == 1.0, "method"]) == {"full"}  # 1.0 is not in this grid
    agg = aggregate(answers, overlaps, cfg)
    assert {"f1_own_per_head", "delta_per_head_vs_shared"} <= set(agg["quantity"])
    text = summary_markdown(agg, answers, timings, cfg, "tiny", "synthetic-small")
    assert "per-head − shared" in text


def test_has_answer_and_no_answer_breakdown():
    rows = []
    for i in range(6):
        impossible = i >= 4
        for role in ("scout", "main"):
            rows.append({"sample_idx": i, "role": role, "model": role, "method": "full", "retention": 1.0,
                         "source": "none", "f1": 0.0 if impossible else 1.0, "exact": 0.0 if impossible else 1.0,
                         "is_impossible": impossible})
    cfg = {"bootstrap": 200, "ci": 0.95, "seed": 0}
    agg = aggregate(pd.DataFrame(rows), pd.DataFrame(columns=["method", "retention", "sample_idx"]), cfg)
    main = agg[(agg["table"] == "full_kv") & (agg["role"] == "main")].set_index("quantity")["value"]
    assert main["f1_has_answer"] == 1.0 and main["f1_no_answer"] == 0.0
    assert main["f1"] == pytest.approx(4 / 6)

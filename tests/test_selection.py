import copy

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvpipe.config import validate
from kvpipe.data.prompt import QUESTION, build_prompt
from kvpipe.data.qa_metrics import score_prediction, squad_exact, squad_f1
from kvpipe.errors import KvpipeError
from kvpipe.estimands import AT_FLOOR
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.io import read_json
from kvpipe.scoring.methods import METHODS, Q2C, Random, ScoringInputs, SnapKV, build_methods, top_k, top_n
from kvpipe.scoring.select import context_budget, select
from kvpipe.selection import stage
from kvpipe.selection.aggregate import aggregate
from kvpipe.selection.gather import gather
from kvpipe.selection.report import FIGURES, summary_markdown, write_report
from kvpipe.selection.stage import overlap_row, run_pair, run_selection
from kvpipe.settings import SelectionSettings, recorded
from kvpipe.splits import whole_passages


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
    (full,) = s.answer(_rows(np.arange(n_ctx)), 8, capture_row=0)
    return s, full


def _rows(*selections):
    return [AnswerRequest(f"row {i}", sel) for i, sel in enumerate(selections)]


def _inputs(s):
    return ScoringInputs.from_session(s, 0)


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
    learned = overlaps[overlaps["method"] != "random"]   # (random selections are shared: their overlap is 1)
    assert (learned["overlap"] < 1).any() and learned["overlap"].between(0, 1).all()   # two models' selections differ
    assert {"prefill_s", "pruned_answers_s"} <= set(timings.columns)


@pytest.mark.slow
def test_stage_writes_tables_and_facts_and_the_report_reads_only_them(tmp_path, model_dirs, samples, smoke_config):
    """Four sampled questions on three passages (the last two share one); max_samples 3 keeps the first two passages."""
    cfg = smoke_config["selection"] | {"retention": [0.5], "max_new_tokens": 2, "max_samples": 3}
    table = samples.iloc[1:5]
    assert table["passage"].nunique() == 3 and table["passage"].iloc[2] == table["passage"].iloc[3]
    table.iloc[::-1].to_parquet(tmp_path / "samples.parquet")   # sample order is sample_idx, not row order
    run_selection(model_dirs["tiny-scout"], model_dirs["tiny-main"], tmp_path / "samples.parquet", "tiny", cfg,
                  smoke_config["prompt"], "cpu", "float32", tmp_path / "stage")
    tables = sorted(p.name for p in (tmp_path / "stage").iterdir())
    assert tables == ["answers.parquet", "facts.json", "overlap.parquet", "timings.parquet"]
    facts = read_json(tmp_path / "stage" / "facts.json")
    assert facts == {"pair": "tiny", "scout": "tiny-scout", "main": "tiny-main", "n_samples": 2, "n_sampled": 4,
                     "selection": cfg}
    stage = tmp_path / "stage"
    passage = table.set_index("sample_idx")["passage"]
    for name in ("answers", "overlap"):
        frame = pd.read_parquet(stage / f"{name}.parquet")
        assert set(frame["sample_idx"]) == set(table["sample_idx"].iloc[:2])
        assert frame["passage"].tolist() == passage.loc[frame["sample_idx"]].tolist()
    write_report(stage / "answers.parquet", stage / "overlap.parquet", stage / "facts.json",
                 {"timings.parquet": stage / "timings.parquet"}, "synthetic-small", tmp_path / "report")
    timing = (tmp_path / "report/timing.md").read_text()
    assert "| main |" in timing and "| scout |" in timing
    figures = {p.name for p in (tmp_path / "report" / "figures").iterdir()}
    assert figures == {f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")}
    summary = (tmp_path / "report/summary.md").read_text()
    assert "tiny-scout (scout) ↔ tiny-main (main), pair tiny, synthetic-small" in summary
    assert "2 samples from 2 passages: a subset of the 4 sampled (`selection.max_samples: 3`" in summary
    assert "bootstrap over passages" in summary
    agg = pd.read_parquet(tmp_path / "report/aggregates.parquet")
    assert {"q2c", "snapkv", "random", "full"} <= set(agg["method"]) and {"main", "scout"} <= set(agg["role"])
    assert {"transfer", "overlap"} <= set(agg["table"])


@pytest.mark.slow
def test_chunks_gathered_equal_the_whole_run_byte_for_byte_with_max_samples(tmp_path, model_dirs, samples, smoke_config):
    """max_samples 3 keeps the first two passages of samples 1..4 (kvpipe.splits.whole_passages on the whole table):
    chunk [1, 3) answers both its samples, chunk [3, 5) none (its two samples share the third passage) and loads no
    model; their tables, gathered, are the whole run's byte for byte, and so is facts.json."""
    cfg = smoke_config["selection"] | {"retention": [0.5], "max_new_tokens": 2, "max_samples": 3}
    table = samples.iloc[1:5]
    table.to_parquet(tmp_path / "samples.parquet")
    models = (model_dirs["tiny-scout"], model_dirs["tiny-main"])
    run_selection(*models, tmp_path / "samples.parquet", "tiny", cfg, smoke_config["prompt"], "cpu", "float32",
                  tmp_path / "whole")
    chunks = []
    for i, rows in enumerate((table.iloc[:2], table.iloc[2:])):
        rows.to_parquet(tmp_path / f"chunk{i}.parquet")
        chunks.append(tmp_path / "chunks" / str(i))
        stage.run_chunk(*models, tmp_path / f"chunk{i}.parquet", "tiny", cfg, smoke_config["prompt"], "cpu", "float32",
                        chunks[-1], tmp_path / "samples.parquet")
    assert len(pd.read_parquet(chunks[0] / "answers.parquet")) and not len(pd.read_parquet(chunks[1] / "answers.parquet"))
    gather(chunks, tmp_path / "samples.parquet", {"scout": models[0], "main": models[1]}, "tiny", cfg, tmp_path / "gathered")
    for name in ("answers.parquet", "overlap.parquet", "facts.json"):
        assert (tmp_path / "gathered" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    with pytest.raises(KvpipeError, match="selection.max_samples: the chunk needs the whole sample table"):
        stage.run_chunk(*models, tmp_path / "chunk0.parquet", "tiny", cfg, smoke_config["prompt"], "cpu", "float32",
                        tmp_path / "nowhere")


def _with_alignment(smoke_config, **kw):
    """The selection settings as the rule passes them: with alignment.min_cover (workflow/rules/selection.smk)."""
    return smoke_config["selection"] | {"alignment": {"min_cover": smoke_config["alignment"]["min_cover"]}} | kw


OVERLAP_COLUMNS = ["sample_idx", "sample_id", "passage", "is_impossible", "method", "retention", "spearman", "overlap",
                   "jaccard", "overlap_random", "jaccard_random", "n_forced"]


def _spy_transfers(monkeypatch) -> list:
    """Record each sample's (own selections, transfers, budgets) as PairRun builds them."""
    seen, original = [], stage.PairRun.transfers

    def spy(self, scores, selections, budgets, alignments):
        out = original(self, scores, selections, budgets, alignments)
        seen.append((selections, out, budgets))
        return out

    monkeypatch.setattr(stage.PairRun, "transfers", spy)
    return seen


@pytest.mark.slow
def test_a_pair_sharing_a_tokenizer_exchanges_selections_unchanged(model_dirs, samples, smoke_config, monkeypatch):
    """The identity alignment: the partner's own selection as it is, the overlap of the two own selections, and
    exactly the overlap table's columns of an unaligned run; no character alignment is ever built."""
    seen = _spy_transfers(monkeypatch)
    monkeypatch.setattr(stage, "align", lambda *a: pytest.fail("a same-tokenizer pair built a character alignment"))
    cfg = _with_alignment(smoke_config, retention=[0.25, 0.5], max_new_tokens=2)
    _, overlaps, _ = run_pair({"scout": model_dirs["tiny-scout"], "main": model_dirs["tiny-main"]}, samples.head(2),
                              "tiny", cfg, smoke_config["prompt"], "cpu", "float32")
    assert list(overlaps.columns) == OVERLAP_COLUMNS and len(seen) == 2
    for (selections, transfers, budgets), (_, rows) in zip(seen, overlaps.groupby("sample_idx", sort=False)):
        assert budgets["scout"] == budgets["main"]
        for role, other in (("main", "scout"), ("scout", "main")):
            assert all(transfers[role][m][r] is selections[other][m][r] for m in selections[other] for r in budgets[role])
        for row in rows.itertuples():
            a, b = selections["scout"][row.method][row.retention], selections["main"][row.method][row.retention]
            assert row.overlap == len(np.intersect1d(a, b)) / len(b)


@pytest.mark.slow
def test_a_pair_with_different_tokenizers_runs_end_to_end(tmp_path, model_dirs, samples, smoke_config, monkeypatch):
    seen = _spy_transfers(monkeypatch)
    cfg = _with_alignment(smoke_config, retention=[0.25, 0.5], max_new_tokens=2, per_head=True)
    samples.head(3).to_parquet(tmp_path / "samples.parquet")
    run_selection(model_dirs["tiny-llama"], model_dirs["tiny-main"], tmp_path / "samples.parquet", "mixed", cfg,
                  smoke_config["prompt"], "cpu", "float32", tmp_path / "stage")
    stage_dir = tmp_path / "stage"
    answers, overlaps = (pd.read_parquet(stage_dir / f"{name}.parquet") for name in ("answers", "overlap"))
    facts = read_json(stage_dir / "facts.json")
    assert facts["scout"] == "tiny-llama" and facts["selection"]["alignment"] == {"min_cover": 0.5}
    pruned = answers[(answers["retention"] < 1) & (answers["retention"] > 0)]   # 0: the floors
    assert set(pruned["source"]) == {"own", "transfer", "own_per_head"}
    assert (pruned["n_kept_context"] == (pruned["n_context"] * pruned["retention"]).round()).all()   # budgets exact
    n_context = answers.groupby(["sample_idx", "role"])["n_context"].first().unstack()
    assert (n_context["scout"] != n_context["main"]).all()   # the two tokenizers split the contexts differently
    for _, transfers, budgets in seen:   # each model gets exactly its own budget from its partner
        for role in ("scout", "main"):
            for by_r in transfers[role].values():
                assert {r: len(sel) for r, sel in by_r.items()} == budgets[role]
                assert all((np.diff(sel) > 0).all() for sel in by_r.values())
    assert list(overlaps.columns) == OVERLAP_COLUMNS + ["char_overlap", "char_overlap_random"]
    for col in ("overlap", "overlap_random", "char_overlap", "char_overlap_random"):
        assert overlaps[col].between(0, 1).all()
    write_report(stage_dir / "answers.parquet", stage_dir / "overlap.parquet", stage_dir / "facts.json",
                 {"timings.parquet": stage_dir / "timings.parquet"}, "synthetic-small", tmp_path / "report")
    summary = (tmp_path / "report/summary.md").read_text()
    assert "## Selection overlap in characters (the tokenizers differ)" in summary
    assert "a main token is kept when the scout's kept tokens cover at least 0.5 of its characters" in summary
    agg = pd.read_parquet(tmp_path / "report/aggregates.parquet")
    assert {"char_overlap", "char_overlap_random", "char_overlap_minus_random"} <= set(agg["quantity"])


@pytest.mark.slow
def test_min_cover_changes_what_crosses_tokenizers(model_dirs, samples, smoke_config, monkeypatch):
    seen = _spy_transfers(monkeypatch)
    for min_cover in (0.01, 1.0):
        run_pair({"scout": model_dirs["tiny-llama"], "main": model_dirs["tiny-main"]}, samples.head(1), "mixed",
                 _with_alignment(smoke_config, retention=[0.5], max_new_tokens=1, methods=["q2c"],
                                 alignment={"min_cover": min_cover}), smoke_config["prompt"], "cpu", "float32")
    (_, loose, budgets), (_, strict, _) = seen
    assert len(loose["main"]["q2c"][0.5]) == len(strict["main"]["q2c"][0.5]) == budgets["main"][0.5]
    assert not np.array_equal(loose["main"]["q2c"][0.5], strict["main"]["q2c"][0.5])


@pytest.fixture(scope="module")
def eager_attentions(session, model_dirs):
    """Per layer [Hq, T, T] attention of a plain eager forward over the whole prompt."""
    s, _ = session
    with torch.no_grad():
        out = _eager(model_dirs["tiny-main"])(torch.as_tensor(s.tokens.input_ids)[None], output_attentions=True)
    return [a[0] for a in out.attentions]


def _eager_q2c(method, s, attentions, hkv):
    rows, n = np.flatnonzero(s.tokens.segment == QUESTION), s.context.stop - s.context.start
    return np.stack([a[:, rows][:, :, s.context].sum(1).reshape(hkv, -1, n).mean(1).numpy() for a in attentions])


def _eager_snapkv(method, s, attentions, hkv):
    end, n = s.context.stop, s.context.stop - s.context.start
    w, pad = min(method.window, s.own.window_queries[0].shape[1], n), method.kernel // 2
    pool = torch.nn.functional.max_pool1d if method.pooling == "max" else torch.nn.functional.avg_pool1d
    layers = []
    for a in attentions:
        col = a[:, end - w:end, s.context.start:end - w].sum(1).reshape(hkv, -1, n - w)
        col = col.amax(1) if method.head_reduce == "max" else col.mean(1)
        pooled = pool(torch.nn.functional.pad(col[:, None], (pad, pad), mode="replicate"), method.kernel, stride=1)[:, 0]
        layers.append(np.concatenate([pooled.numpy(), np.full((hkv, w), np.inf if method.keep_window else 0.0)], axis=1))
    return np.stack(layers)


EAGER = {"q2c": _eager_q2c, "snapkv": _eager_snapkv}   # reference of every attention-based method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_selection_method_contract(name, session, eager_attentions, smoke_config, tiny_main):
    s, _ = session
    inputs, cfg = _inputs(s), smoke_config["selection"]
    method = METHODS[name].from_config(cfg)
    layers, hkv, n = tiny_main.card["num_layers"], tiny_main.card["num_kv_heads"], s.context.stop - s.context.start
    heads, score = method.head_scores(inputs), method.score(inputs)
    assert heads.shape == (layers, hkv, n) and score.shape == (n,)
    assert np.array_equal(heads, METHODS[name].from_config(cfg).head_scores(inputs))      # deterministic
    assert np.array_equal(score, method.score(inputs))
    pinned = np.zeros(n, dtype=bool)
    if isinstance(method, SnapKV) and method.keep_window:   # documented: the observation window scores +inf
        pinned[n - min(method.window, inputs.window_queries[0].shape[1], n):] = True
    assert np.isposinf(heads[..., pinned]).all() and np.isfinite(heads[..., ~pinned]).all()
    for r in (0.001, 0.25, 0.5, 1.0):
        k = max(1, round(r * n))
        shared, per_head = top_k(score, r), top_k(heads, r)
        assert shared.shape == (k,) and per_head.shape == (layers, hkv, k)
        assert (np.diff(shared) > 0).all() and 0 <= shared[0] and shared[-1] < n
    if method.attention_based:
        np.testing.assert_allclose(heads, EAGER[name](method, s, eager_attentions, hkv), rtol=1e-4, atol=1e-6)


def test_unknown_method_is_a_one_line_error(smoke_config):
    with pytest.raises(KvpipeError, match=r"^selection.methods: unknown method 'h2o'; known: q2c, random, snapkv$"):
        build_methods(smoke_config["selection"] | {"methods": ["q2c", "h2o"]})
    assert METHODS == {"q2c": Q2C, "snapkv": SnapKV, "random": Random}


def test_methods_from_config(smoke_config):
    methods = build_methods(smoke_config["selection"] | {"snapkv": {"preset": "kvpress", "kernel": 3}})
    snap = [m for m in methods if m.name == "snapkv"][0]
    assert (snap.window, snap.kernel, snap.pooling) == (64, 3, "avg")
    assert [m.name for m in methods] == ["q2c", "snapkv", "random"]


@pytest.mark.parametrize("budget", ["context", "prompt"])
def test_select_is_top_k_of_the_scores_at_the_budget_computed_once_per_budget(session, smoke_config, budget, monkeypatch):
    """select = top-k of the method's scores at k = context_budget(r, n, template prefix); a method whose scores do not
    depend on k is scored once for every retention, a budget-dependent one once per distinct k."""
    s, _ = session
    n, prefix = s.context.stop - s.context.start, s.tokens.context_start
    for name in sorted(METHODS):
        method, inputs, calls = METHODS[name].from_config(smoke_config["selection"]), _inputs(s), []
        counted = lambda i, k=None, m=method, c=calls: c.append(k) or type(m).head_scores(m, i, k)  # noqa: E731
        monkeypatch.setattr(method, "head_scores", counted)
        for r in (0.1, 0.25, 0.5, 0.1):
            k = context_budget(r, n, prefix, budget)
            expected = type(method).head_scores(method, inputs, k if method.budget_dependent else None)
            assert np.array_equal(select(method, inputs, r, budget), top_n(method.reduce_heads(expected).sum(0), k))
            assert np.array_equal(select(method, inputs, r, budget, per_head=True), top_n(expected, k))
        distinct = {context_budget(r, n, prefix, budget) for r in (0.1, 0.25, 0.5)}
        assert sorted(calls, key=str) == sorted(distinct if method.budget_dependent else [None], key=str), name


def test_per_head_scores_reduce_to_the_shared_scores(session):
    s, _ = session
    inputs = _inputs(s)
    for method in (Q2C(), SnapKV(window=16, kernel=5, pooling="max"), Random(0)):
        heads = method.head_scores(inputs)
        assert heads.shape[:2] == (len(s.question.keys), s.question.keys[0].shape[0])
        np.testing.assert_allclose(method.score(inputs), method.reduce_heads(heads).sum(0))
    sel = top_k(Q2C().head_scores(inputs), 0.25)
    assert sel.shape[-1] == round(0.25 * (s.context.stop - s.context.start))
    assert not all(np.array_equal(sel[0, 0], sel[l, h]) for l in range(sel.shape[0]) for h in range(sel.shape[1]))
    (ans,) = s.answer(_rows(sel), 4)
    assert ans.kept == s.tokens.context_start + sel.shape[-1]


@pytest.mark.slow
def test_pair_run_with_per_head_conditions(model_dirs, samples, smoke_config):
    cfg = smoke_config["selection"] | {"retention": [0.5], "max_new_tokens": 2, "per_head": True}
    answers, overlaps, timings = run_pair({"scout": model_dirs["tiny-scout"], "main": model_dirs["tiny-main"]},
                                          samples.head(2), "tiny", cfg, smoke_config["prompt"], "cpu", "float32")
    per_head = answers[answers["source"] == "own_per_head"]
    assert set(per_head["method"]) == {"q2c", "snapkv"} and set(per_head["role"]) == {"scout", "main"}
    assert set(answers["retention"]) == {0.0, 0.5, 1.0}   # 0: the floors no_context and always_abstain
    assert set(answers.loc[answers["retention"] == 1.0, "method"]) == {"full"}  # 1.0 is not in this grid
    assert set(answers.loc[answers["retention"] == 0.0, "method"]) == {"no_context", "always_abstain"}
    agg = aggregate(answers, overlaps, recorded(SelectionSettings, "selection", cfg), 0.05)
    assert {"f1_own_per_head", "delta_per_head_vs_shared"} <= set(agg["quantity"])
    facts = {"pair": "tiny", "scout": "tiny-scout", "main": "tiny-main", "n_sampled": 2, "selection": cfg}
    text = summary_markdown(agg, answers, facts, "synthetic-small", 0.05)
    assert "per-head − shared" in text and "2 samples from 2 passages (all 2 sampled)" in text


def test_has_answer_and_no_answer_breakdown():
    rows = []
    for i in range(6):
        impossible = i >= 4
        for role in ("scout", "main"):
            rows.append({"sample_idx": i, "passage": f"p{i}", "role": role, "model": role, "method": "full", "retention": 1.0,
                         "source": "none", "f1": 0.0 if impossible else 1.0, "exact": 0.0 if impossible else 1.0,
                         "is_impossible": impossible, "prediction": "x", "abstained": False, "empty": False})
    cfg = {"bootstrap": 200, "ci": 0.95, "seed": 0}
    agg = aggregate(pd.DataFrame(rows), pd.DataFrame(columns=["method", "retention", "sample_idx"]),
                    recorded(SelectionSettings, "selection", cfg), 0.05)
    main = agg[(agg["table"] == "full_kv") & (agg["role"] == "main")].set_index("quantity")["value"]
    assert main["f1_answerable"] == 1.0 and main["f1_unanswerable"] == 0.0
    assert main["abstain_unanswerable"] == 0.0 and main["abstain_answerable"] == 0.0
    assert main["f1"] == pytest.approx(4 / 6)


def test_an_abstaining_condition_wins_no_answer_quality_verdict():
    """The issue's planted check for the selection stage: on a set with 60 % unanswerable questions a pruned
    condition that abstains everywhere beats the full KV on all-question F1 and still reads 'worse' on answerable F1."""
    rows = []
    for i in range(50):
        impossible, p = i % 5 >= 2, f"p{i // 5}"
        base = {"sample_idx": i, "passage": p, "is_impossible": impossible, "empty": False}
        for role in ("scout", "main"):
            good = {"prediction": "x", "f1": 0.0 if impossible else 0.8, "exact": 0.0, "abstained": False}
            rows.append(base | good | {"role": role, "method": "full", "retention": 1.0, "source": "none"})
            rows.append(base | good | {"role": role, "method": "q2c", "retention": 0.5, "source": "own"})
            abstains = {"prediction": "", "f1": float(impossible), "exact": float(impossible), "abstained": True}
            rows.append(base | abstains | {"role": role, "method": "q2c", "retention": 0.5, "source": "transfer"})
    agg = aggregate(pd.DataFrame(rows), pd.DataFrame(columns=["method", "retention", "sample_idx"]),
                    recorded(SelectionSettings, "selection", {"bootstrap": 300, "ci": 0.95, "seed": 0}),
                    0.05).set_index(["table", "role", "quantity"])
    forward = agg.loc[("transfer", "main", "delta_forward")]
    assert forward["value"] == pytest.approx(-0.8) and forward["verdict"] == "worse"
    assert agg.loc[("transfer_all", "main", "delta_forward"), "value"] > 0   # what the all-question F1 would claim
    assert agg.loc[("abstention", "main", "abstain_unanswerable_transfer"), "value"] == 1.0


def test_a_model_that_does_not_read_its_context_gets_no_transfer_verdict():
    """The long-context record's trap: where the main's full KV scores no better than its no_context floor, own and
    transferred selections both score 0 and their delta would be 'equivalent' by construction. It reads 'at the
    floor'; the scout, which reads its context, keeps its verdicts."""
    rows = []
    for i in range(40):
        base = {"sample_idx": i, "passage": f"p{i // 4}", "is_impossible": False, "exact": 0.0, "prediction": "x",
                "abstained": False, "empty": False}
        for role, full in (("scout", 0.8), ("main", 0.0)):
            rows.append(base | {"role": role, "method": "full", "retention": 1.0, "source": "none", "f1": full})
            rows.append(base | {"role": role, "method": "no_context", "retention": 0.0, "source": "none", "f1": 0.0})
            for source in ("own", "transfer"):
                rows.append(base | {"role": role, "method": "q2c", "retention": 0.5, "source": source, "f1": full})
    agg = aggregate(pd.DataFrame(rows), pd.DataFrame(columns=["method", "retention", "sample_idx"]),
                    recorded(SelectionSettings, "selection", {"bootstrap": 300, "ci": 0.95, "seed": 0}), 0.05)
    judged = agg[agg["table"].isin(("transfer", "full_kv")) & (agg["verdict"] != "")].set_index(
        ["table", "role", "quantity"]).sort_index()["verdict"]
    assert judged[("full_kv", "main", "delta_full_vs_no_context")] == "equivalent"   # at its floor
    assert judged[("full_kv", "scout", "delta_full_vs_no_context")] == "better"
    assert set(judged.loc["transfer", "main"]) == {AT_FLOOR}   # forward and own − full: 0 − 0, not judged
    assert judged[("transfer", "scout", "delta_reverse")] == "equivalent"   # 0.8 − 0.8 on a model that reads


def _planted_answers(passage_of) -> pd.DataFrame:
    """Answers of 60 questions on 12 passages (5 each): every condition's F1 is a function of the passage alone."""
    r = np.random.default_rng(1)
    level, cost = r.random(12), r.choice([0.0, 0.3], size=12)   # per passage: F1 level, forward-transfer cost
    rows = []
    for i in range(60):
        p, base = i // 5, {"sample_idx": i, "passage": passage_of(i), "is_impossible": False, "exact": 0.0,
                           "prediction": "x", "abstained": False, "empty": False}
        for role in ("scout", "main"):
            rows.append(base | {"role": role, "method": "full", "retention": 1.0, "source": "none", "f1": level[i // 5]})
            for source, f1 in (("own", level[p]), ("transfer", level[p] - (cost[p] if role == "main" else 0.0))):
                rows.append(base | {"role": role, "method": "q2c", "retention": 0.5, "source": source, "f1": f1})
            rows.append(base | {"role": role, "method": "random", "retention": 0.5, "source": "own", "f1": level[p] / 2})
    return pd.DataFrame(rows)


def test_every_interval_and_p_value_resamples_passages_not_questions():
    """Questions on one passage are perfectly correlated: the passage bootstrap's intervals are about √5 times wider
    than a question bootstrap's (each question its own passage), and its p-values larger."""
    overlaps = pd.DataFrame(columns=["method", "retention", "sample_idx"])
    cfg = recorded(SelectionSettings, "selection", {"bootstrap": 1000, "ci": 0.95, "seed": 0})
    by_passage = aggregate(_planted_answers(lambda i: f"p{i // 5}"), overlaps, cfg, 0.05)
    by_question = aggregate(_planted_answers(lambda i: f"q{i}"), overlaps, cfg, 0.05)
    by_passage, by_question = (a[a["table"] != "abstention"].set_index(["role", "method", "quantity"])
                               for a in (by_passage, by_question))
    width = (by_passage["ci_high"] - by_passage["ci_low"]) / (by_question["ci_high"] - by_question["ci_low"])
    for key in (("main", "full", "f1"), ("main", "q2c", "f1_own"), ("main", "q2c", "delta_forward"),
                ("scout", "q2c", "delta_own_vs_random")):
        assert 1.6 < width.loc[key] < 3.2, key
    forward = ("main", "q2c", "delta_forward")
    assert by_passage.loc[forward, "p_value"] > 10 * by_question.loc[forward, "p_value"]


def test_selection_subset_takes_whole_passages_in_sample_order():
    passages = np.array(["a", "b", "a", "c", "b", "d", "c", "e"], dtype=object)   # sizes a 2, b 2, c 2, d 1, e 1
    assert whole_passages(passages, None).tolist() == list(range(8))
    assert whole_passages(passages, 5).tolist() == [0, 1, 2, 4]          # a + b; c would make 6
    assert whole_passages(passages, 7).tolist() == [0, 1, 2, 3, 4, 5, 6]  # a + b + c + d; e would make 8
    assert whole_passages(passages, 1).tolist() == [0, 2]                # at least one passage, whole
    assert whole_passages(passages, 100).tolist() == list(range(8))


@pytest.mark.parametrize("value, message", [
    (0, "selection.max_samples: 0 is less than the minimum of 1"),
    ("ten", "selection.max_samples: 'ten' is not of type 'integer', 'null'"),
    (2.5, "selection.max_samples: 2.5 is not of type 'integer', 'null'"),
])
def test_max_samples_must_be_a_positive_integer_or_null(smoke_config, value, message):
    config = copy.deepcopy(smoke_config)
    assert config["selection"]["max_samples"] is None                    # default: every sample
    config["selection"]["max_samples"] = value
    with pytest.raises(KvpipeError) as info:
        validate(config)
    assert message in str(info.value) and "\n" not in str(info.value)
    config["selection"]["max_samples"] = 3
    assert validate(config)["selection"]["max_samples"] == 3


def test_query_aware_snapkv_equals_pooled_attention_of_the_last_question_rows(session, eager_attentions, tiny_main):
    s, _ = session
    hkv, n, k = tiny_main.card["num_kv_heads"], s.context.stop - s.context.start, 3
    method = SnapKV(window=4, kernel=3, pooling="avg", protocol="query_aware")
    rows = np.flatnonzero(s.tokens.segment == QUESTION)[-4:]
    layers = []
    for a in eager_attentions:
        col = a[:, rows][:, :, s.context].sum(1).reshape(hkv, -1, n).mean(1)
        layers.append(torch.nn.functional.avg_pool1d(torch.nn.functional.pad(col[:, None], (1, 1), mode="replicate"), 3,
                                                     stride=1)[:, 0].numpy())
    heads = method.head_scores(_inputs(s), k)
    np.testing.assert_allclose(heads, np.stack(layers), rtol=1e-4, atol=1e-6)
    assert np.isfinite(heads).all()                          # the window is the question: no context token is forced


def test_budgeted_snapkv_forces_exactly_its_forced_positions(session):
    s, _ = session
    n = s.context.stop - s.context.start
    method = SnapKV(window=16, kernel=3, max_window_fraction=0.5)
    for k in (1, 4, round(0.25 * n), n):
        score = method.score(_inputs(s), k)
        forced = method.forced_positions(n, k)
        assert np.flatnonzero(np.isposinf(score)).tolist() == forced.tolist() and len(forced) <= 0.5 * k
        assert set(forced) <= set(top_k(score, k / n))


def test_prompt_budget_and_realised_retention(model_dirs, samples, smoke_config):
    cfg = smoke_config["selection"] | {"retention": [0.5], "max_new_tokens": 2, "budget": "prompt"}
    answers, overlaps, _ = run_pair({"scout": model_dirs["tiny-scout"], "main": model_dirs["tiny-main"]},
                                    samples.head(1), "tiny", cfg, smoke_config["prompt"], "cpu", "float32")
    pruned = answers[answers["retention"] == 0.5]
    prompt = pruned["n_template"] + pruned["n_context"]
    assert (pruned["n_kept_context"] == ((0.5 * prompt).round() - pruned["n_template"]).clip(1, pruned["n_context"])).all()
    np.testing.assert_allclose(pruned["retention_prompt"], (pruned["n_template"] + pruned["n_kept_context"]) / prompt)
    np.testing.assert_allclose(pruned["retention_context"], pruned["n_kept_context"] / pruned["n_context"])
    snap = overlaps[overlaps["method"] == "snapkv"]
    k = pruned["n_kept_context"].iloc[0]
    assert (snap["n_forced"] <= 0.5 * k).all() and (snap["overlap_random"] >= snap["n_forced"] / k).all()


def test_full_kv_main_minus_scout_is_a_paired_difference():
    rows = []
    for i in range(8):
        for role, f1 in (("scout", float(i % 2)), ("main", 1.0)):
            rows.append({"sample_idx": i, "passage": f"p{i}", "role": role, "model": role, "method": "full",
                         "retention": 1.0, "source": "none", "f1": f1, "exact": f1, "is_impossible": False,
                         "prediction": "x", "abstained": False, "empty": False})
    agg = aggregate(pd.DataFrame(rows), pd.DataFrame(columns=["method", "retention", "sample_idx"]),
                    recorded(SelectionSettings, "selection", {"bootstrap": 200, "ci": 0.95, "seed": 0}), 0.05)
    gap = agg[(agg["table"] == "full_kv") & (agg["quantity"] == "f1_main_minus_scout")].iloc[0]
    assert gap["role"] == "pair" and gap["value"] == pytest.approx(0.5)
    assert 0 < gap["ci_low"] < 0.5 < gap["ci_high"] <= 1

"""Cache sources, conditions and batched answering (kvpipe.inference)."""

import dataclasses

import numpy as np
import pytest
import torch

from kvpipe.data.prompt import build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.inference.cache_sources import CACHE_SOURCES, ContextKV, GivenTensors, OwnPrefill
from kvpipe.inference.decode import reply_end_id, stop_ids
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.models.tiny import END_OF_TEXT, IM_END, build_tokenizer
from kvpipe.scoring.methods import top_k


@pytest.fixture(scope="module")
def tokens(tiny_main, samples, smoke_config):
    row = samples.iloc[0]
    return build_prompt(tiny_main.tokenizer, smoke_config["prompt"], row["context"], row["question"])


@pytest.fixture(scope="module")
def session(tiny_main, tokens):
    s = Session(tiny_main, tokens, window=16)
    (full,) = s.answer([AnswerRequest("full")], 8, capture_row=0)
    return s, full


def _rows(*selections):
    return [AnswerRequest(f"row {i}", sel) for i, sel in enumerate(selections)]


def _copy(kv: ContextKV) -> ContextKV:
    return ContextKV([k.clone() for k in kv.keys], [v.clone() for v in kv.values], kv.positions.clone())


def test_cache_sources_are_registered_by_name():
    assert CACHE_SOURCES == {"own_prefill": OwnPrefill, "given": GivenTensors}


@pytest.mark.parametrize("rerotate", [False, True])
def test_given_tensors_of_the_own_prefill_answer_like_the_own_prefill(tiny_main, tokens, rerotate):
    s = Session(tiny_main, tokens, window=16)
    s.add(GivenTensors(_copy(s.own)), "given")
    n_ctx = tokens.context_end - tokens.context_start
    rng = np.random.default_rng(0)
    layers, heads = tiny_main.card["num_layers"], tiny_main.card["num_kv_heads"]
    selections = [None, np.sort(rng.choice(n_ctx, n_ctx // 4, replace=False)),
                  np.sort(rng.random((layers, heads, n_ctx)).argsort(-1)[..., : n_ctx // 2], axis=-1)]
    conditions = [AnswerRequest(f"{cache} {i}", sel, cache=cache)
                  for i, sel in enumerate(selections) for cache in ("own_prefill", "given")]
    batched = s.answer(conditions, 8, rerotate=rerotate)          # one batch mixing both sources
    single = [s.answer([c], 8, rerotate=rerotate)[0] for c in conditions]
    ids = [a.token_ids for a in batched]
    assert ids[0::2] == ids[1::2]                                 # given rows == own-prefill rows
    assert ids == [a.token_ids for a in single]                   # batched == one at a time
    assert [a.cache_length for a in batched] == [a.cache_length for a in single]
    assert any(ids)


@pytest.mark.parametrize("change, message", [
    (lambda kv: ContextKV(kv.keys[:-1], kv.values, kv.positions), "layers of keys is 2, expected 3"),
    (lambda kv: ContextKV(kv.keys, [v[:1] for v in kv.values], kv.positions), r"values of layer 0 .* is \(1, "),
    (lambda kv: ContextKV([k[:, :-1] for k in kv.keys], kv.values, kv.positions), r"keys of layer 0 .* expected \(2, "),
    (lambda kv: ContextKV([k[..., :8] for k in kv.keys], kv.values, kv.positions), r"keys of layer 0 .*, 8\), expected"),
    (lambda kv: ContextKV(kv.keys, kv.values, kv.positions[1:]), r"positions \[tokens\] is"),
])
def test_given_tensors_of_the_wrong_shape_are_a_one_line_error(tiny_main, tokens, change, message):
    own = OwnPrefill(16).context_kv(tiny_main, tokens)
    with pytest.raises(KvpipeError, match=f"given KV for model tiny-main: {message}") as err:
        GivenTensors(change(own)).context_kv(tiny_main, tokens)
    assert "\n" not in str(err.value)


def test_unknown_context_or_mixed_roles_are_rejected(tiny_main, tokens):
    s = Session(tiny_main, tokens, window=8)
    with pytest.raises(KvpipeError, match="no context KV named 'projected'"):
        s.answer([AnswerRequest("x", cache="projected")], 2)
    with pytest.raises(KvpipeError, match="mixes the roles"):
        s.answer([AnswerRequest("a", role="scout"), AnswerRequest("b", role="main")], 2)


def test_tiny_models_end_turns_like_qwen(tiny_main):
    tok = tiny_main.tokenizer
    assert tok.eos_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [IM_END, END_OF_TEXT]
    assert tiny_main.model.generation_config.eos_token_id == [IM_END, END_OF_TEXT]   # kept by save_pretrained
    assert stop_ids(tiny_main) == sorted([IM_END, END_OF_TEXT])


@pytest.mark.parametrize("template, expected", [
    (None, IM_END),                                                                     # ChatML
    ("{% for m in messages %}{{ m['content'] }} <|endoftext|>{% endfor %}", END_OF_TEXT),
    ("{% for m in messages %}{{ m['content'] }}.{% endfor %}", None),                  # no added token after a reply
    ("{% for m in messages %}{{ m['role'] }}{% endfor %}", None),                      # no reply rendered
    ("{{ raise_exception('user turns only') }}", None),
])
def test_the_reply_end_is_the_added_token_the_template_closes_a_reply_with(template, expected):
    tok = build_tokenizer()
    tok.chat_template = template or tok.chat_template
    assert reply_end_id(tok) == expected


def test_decoding_stops_at_the_end_of_turn_id_of_the_generation_config(tiny_main, tokens):
    """<|im_end|> is not the tokenizer's eos: stopping only at that would decode all 6 tokens."""
    s = Session(tiny_main, tokens, window=8)
    bonus = 1e4 * (torch.arange(len(tiny_main.tokenizer)) == IM_END)
    hook = tiny_main.model.lm_head.register_forward_hook(lambda m, i, o: o + bonus.to(o))
    try:
        (ans,) = s.answer([AnswerRequest("full")], 6)
    finally:
        hook.remove()
    n_question_part = len(tokens) - tokens.context_end
    assert tiny_main.tokenizer.eos_token_id != IM_END
    assert ans.token_ids == [] and ans.text == ""
    assert ans.kept + n_question_part <= ans.cache_length <= ans.kept + n_question_part + 1


def test_full_retention_answer_equals_plain_generate(session, tiny_main):
    s, full = session
    ids = torch.as_tensor(s.tokens.input_ids)[None]
    with torch.no_grad():
        plain = tiny_main.model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=stop_ids(tiny_main),
                                         pad_token_id=0)
    expected = [t for t in plain[0, ids.shape[1]:].tolist() if t not in stop_ids(tiny_main)]
    assert full.token_ids == expected and len(expected) > 0


def test_cache_holds_kept_plus_question_plus_generated_tokens(session):
    s, _ = session
    n_ctx = s.context.stop - s.context.start
    sel = top_k(np.arange(n_ctx, dtype=float), 0.5)
    (ans,) = s.answer(_rows(sel), 5)
    n_question_part = len(s.tokens) - s.tokens.context_end
    # the last generated token is emitted but never fed back, unless generation stopped at EOS earlier
    assert ans.kept == s.tokens.context_start + len(sel)
    assert ans.cache_length == ans.kept + n_question_part + len(ans.token_ids) - 1
    assert all(k.shape[1] == s.tokens.context_end for k in s.own.keys)  # the prefilled cache itself is never modified


def test_batched_conditions_equal_one_at_a_time(session):
    s, _ = session
    n_ctx = s.context.stop - s.context.start
    rng = np.random.default_rng(0)
    sels = [np.sort(rng.choice(n_ctx, k, replace=False)) for k in (n_ctx // 4, n_ctx // 2, n_ctx)]
    batched = s.answer(_rows(*sels), 6)
    single = [s.answer(_rows(sel), 6)[0] for sel in sels]
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
        s.answer(_rows(keep), 2, capture_row=0)
        return s.question.keys[1][..., -nq:, :]

    pruned = np.arange(n_ctx - 5)
    assert torch.equal(question_keys(tokens, pruned), question_keys(altered, pruned))
    everything = np.arange(n_ctx)
    assert not torch.allclose(question_keys(tokens, everything), question_keys(altered, everything))


def test_rerotation_keeps_full_context_answers_and_runs_pruned(session):
    s, full = session
    n_ctx = s.context.stop - s.context.start
    rerotated = s.answer(_rows(np.arange(n_ctx), top_k(np.arange(n_ctx, dtype=float), 0.25)), 8, rerotate=True)
    assert rerotated[0].token_ids == full.token_ids
    assert rerotated[1].kept == s.tokens.context_start + len(top_k(np.arange(n_ctx, dtype=float), 0.25))


def test_per_head_selection_with_identical_heads_equals_shared(session, tiny_main):
    s, _ = session
    n_ctx = s.context.stop - s.context.start
    shared = top_k(np.random.default_rng(1).random(n_ctx), 0.5)
    layers, heads = tiny_main.card["num_layers"], tiny_main.card["num_kv_heads"]
    per_head = np.broadcast_to(shared, (layers, heads, len(shared))).copy()
    a_shared, a_heads = s.answer(_rows(shared, per_head), 6)
    assert a_shared.token_ids == a_heads.token_ids and a_shared.kept == a_heads.kept

"""Gemma 3 on a tiny random-initialised model: per-layer RoPE, q/k norms, sliding-window layers, chat templates.

The references are the model's own modules: the q_norm / k_norm outputs (the pre-RoPE queries and
keys), its rotary modules chosen by each layer's `is_sliding`, and the attention outputs it computes.
"""

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import REPO
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from kvpipe.config import validate
from kvpipe.data.prompt import QUESTION, build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.inference.cache_sources import OwnPrefill
from kvpipe.inference.decode import reply_end_id, stop_ids
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.kv import extract as ex
from kvpipe.kv import store as kvstore
from kvpipe.models.load import load_model, load_tokenizer
from kvpipe.models.materialize import materialize
from kvpipe.models.rope import layer_rope_tables, rope_tables
from kvpipe.models.tiny import END_OF_TURN, GEMMA_EOS, SLIDING_WINDOW

EXTRACTION = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 4, "compression": "zstd"}
TEMPLATE = REPO / "config" / "templates" / "gemma3.jinja"


@pytest.fixture(scope="module")
def spec(smoke_config):
    """The smoke config's tiny Gemma 3, its template path made independent of the working directory."""
    return smoke_config["models"]["tiny-gemma"] | {"chat_template": str(TEMPLATE)}


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, spec):
    out = tmp_path_factory.mktemp("gemma") / "tiny-gemma"
    materialize("tiny-gemma", spec, out)
    return out


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return load_model(gemma_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def tokens(gemma, samples, smoke_config):
    row = samples.iloc[0]
    return build_prompt(gemma.tokenizer, smoke_config["prompt"], row["context"], row["question"])


@contextmanager
def _seen(lm):
    """Per layer, the q_norm and k_norm outputs [batch, heads, n, d] and the o_proj input [batch, n, Hq*d]."""
    seen = {"q_norm": [], "k_norm": [], "o_proj": []}
    hooks = []
    for layer in lm.model.model.layers:
        attn = layer.self_attn
        hooks += [attn.q_norm.register_forward_hook(lambda m, i, o: seen["q_norm"].append(o.detach())),
                  attn.k_norm.register_forward_hook(lambda m, i, o: seen["k_norm"].append(o.detach())),
                  attn.o_proj.register_forward_hook(lambda m, i, o: seen["o_proj"].append(i[0].detach()))]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _model_rope(lm, x, positions, layer):
    """x [batch, heads, n, d] rotated as the model rotates it in `layer`, with that layer's rotary module."""
    inner = lm.model.model
    rotary = inner.rotary_emb_local if inner.layers[layer].self_attn.is_sliding else inner.rotary_emb
    cos, sin = rotary(x, positions[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


def _as_rows(t):
    """[heads, n, d] -> [n, heads * d] (head-major, as stored)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def test_tiny_gemma_mixes_sliding_and_full_layers_with_their_own_scale(gemma, tokens):
    cfg = gemma.model.config
    assert cfg.model_type == "gemma3_text" and cfg.sliding_window == SLIDING_WINDOW
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (gemma.card["num_layers"], gemma.card["num_kv_heads"], gemma.card["head_dim"]) == (3, 1, 16)
    assert gemma.model.model.layers[0].self_attn.scaling != 16 ** -0.5
    assert tokens.context_end - tokens.context_start > 2 * SLIDING_WINDOW


def test_rope_tables_are_those_of_each_layers_type(gemma):
    pos = torch.arange(40)
    tables = layer_rope_tables(gemma.model, pos)
    for layer, base in ((0, 1e4), (1, 1e6), (2, 1e4)):    # sliding layers: rope_local_base_freq; full: rope_theta
        angle = pos[:, None].double() * base ** (-torch.arange(0, 16, 2).double() / 16)
        np.testing.assert_allclose(tables[layer][0], torch.cat([angle.cos()] * 2, -1), atol=1e-5)
        np.testing.assert_allclose(tables[layer][1], torch.cat([angle.sin()] * 2, -1), atol=1e-5)
        assert all(a.equal(b) for a, b in zip(rope_tables(gemma.model, pos, layer), tables[layer]))
    assert not torch.allclose(tables[0][0], tables[1][0])
    with pytest.raises(KvpipeError, match="^Gemma3ForCausalLM: its layers use different RoPE tables; pass the layer$"):
        rope_tables(gemma.model, pos)


def test_own_prefill_keeps_every_token_and_its_queries_and_keys_give_the_models_attention(gemma, tokens):
    w, n = 2 * SLIDING_WINDOW, tokens.context_end
    with _seen(gemma) as seen:
        kv = OwnPrefill(w).context_kv(gemma, tokens)
    positions = torch.arange(n)
    for layer, attn in enumerate(gemma.model.model.layers):
        assert kv.keys[layer].shape == kv.values[layer].shape == (1, n, 16)   # every token, sliding layers too
        keys = _model_rope(gemma, seen["k_norm"][layer], positions, layer)[0]
        np.testing.assert_allclose(kv.keys[layer], keys, rtol=1e-5, atol=1e-5)
        queries = _model_rope(gemma, seen["q_norm"][layer][:, :, -w:], kv.window_index, layer)[0]
        np.testing.assert_allclose(kv.window_queries[layer], queries, rtol=1e-5, atol=1e-5)
        # softmax(scaling q·k) v over the keys the layer sees (the last sliding_window in a sliding layer)
        t, j = kv.window_index[:, None], positions[None]
        visible = (j <= t) & (j > t - SLIDING_WINDOW) if attn.self_attn.is_sliding else j <= t
        scores = (kv.window_queries[layer] @ kv.keys[layer].transpose(1, 2)) * attn.self_attn.scaling
        out = torch.softmax(scores.masked_fill(~visible, -torch.inf), -1) @ kv.values[layer]
        np.testing.assert_allclose(_as_rows(out), seen["o_proj"][layer][0, -w:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rerotate", [False, True])
def test_full_retention_answer_equals_plain_generate(gemma, tokens, rerotate):
    s = Session(gemma, tokens, window=8)
    (full,) = s.answer([AnswerRequest("full")], 6, rerotate=rerotate, capture_row=0)
    ids = torch.as_tensor(tokens.input_ids)[None]
    with torch.no_grad():
        plain = gemma.model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=stop_ids(gemma), pad_token_id=0)
    assert full.token_ids == [t for t in plain[0, ids.shape[1]:].tolist() if t not in stop_ids(gemma)]
    assert [q.shape[0] for q in s.question.queries] == [2, 2, 2]


def test_question_capture_queries_are_the_models_rotated_queries(gemma, tokens):
    s = Session(gemma, tokens, window=8)
    with _seen(gemma) as seen:
        s.answer([AnswerRequest("full")], 1, capture_row=0)
    rows = torch.as_tensor(np.flatnonzero(tokens.segment[tokens.context_end:] == QUESTION))
    positions = tokens.context_end + rows
    for layer in range(3):
        queries = _model_rope(gemma, seen["q_norm"][layer][:, :, rows], positions, layer)[0]
        np.testing.assert_allclose(s.question.queries[layer], queries, rtol=1e-5, atol=1e-5)


def test_turns_end_at_end_of_turn_though_the_generation_config_names_only_eos(gemma):
    assert gemma.model.generation_config.eos_token_id == GEMMA_EOS
    assert gemma.tokenizer.convert_ids_to_tokens([GEMMA_EOS, END_OF_TURN]) == ["<eos>", "<end_of_turn>"]
    assert reply_end_id(gemma.tokenizer) == END_OF_TURN
    assert stop_ids(gemma) == [GEMMA_EOS, END_OF_TURN]


def test_the_gemma3_template_renders_gemmas_turns(gemma, tokens, smoke_config):
    assert gemma.tokenizer.chat_template == TEMPLATE.read_text()
    text = gemma.tokenizer.decode(tokens.input_ids)
    prompt = smoke_config["prompt"]
    assert text.startswith(f"<bos><start_of_turn>user\n{prompt['system']}\n\nContext:")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_the_chat_template_field_replaces_the_tokenizers_template(tmp_path, smoke_config):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    materialize("tiny-llama", smoke_config["models"]["tiny-llama"] | {"chat_template": str(template)}, tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    assert tok.chat_template == template.read_text()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"


@pytest.mark.parametrize("template, message", [
    (None, r"models\.g: the tokenizer has no chat template; name a Jinja file in models\.g\.chat_template"),
    ("missing", r"models\.g\.chat_template: .*missing\.jinja not found"),
    ("{% if %}", r"models\.g\.chat_template: the chat template cannot render a system and a user message "
                 r"\(TemplateSyntaxError: .+\)"),
    ("{{ raise_exception('System role not supported') }}",
     r"models\.g\.chat_template: the chat template cannot render a system and a user message "
     r"\(TemplateError: System role not supported\)"),
])
def test_a_missing_or_unusable_chat_template_is_a_one_line_error(tmp_path, spec, template, message):
    path = tmp_path / f"{'missing' if template in (None, 'missing') else 'bad'}.jinja"
    if template not in (None, "missing"):
        path.write_text(template)
    bad = {k: v for k, v in spec.items() if k != "chat_template"} | ({} if template is None else {"chat_template": str(path)})
    with pytest.raises(KvpipeError, match=f"^{message}$") as err:
        materialize("g", bad, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_the_schema_checks_chat_template_and_configured_templates_exist(smoke_config):
    cfg = copy.deepcopy(smoke_config)
    cfg["models"]["tiny-gemma"]["chat_template"] = 3
    with pytest.raises(KvpipeError, match="models.tiny-gemma.chat_template: 3 is not of type 'string'"):
        validate(cfg)
    named = [m["chat_template"] for m in smoke_config["models"].values() if "chat_template" in m]
    assert named and all((REPO / path).is_file() for path in named)


# --- extraction: every row of every layer (a config-less DynamicCache keeps the sliding layers whole), keys pre- and
# post-RoPE with each layer's own rotary tables (kvpipe.models.rope.layer_rope_tables) ---

@pytest.fixture(scope="module")
def kv_gemma(tmp_path_factory, gemma_dir, samples_path, smoke_config):
    out = tmp_path_factory.mktemp("kv") / "tiny-gemma"
    return out, ex.extract(gemma_dir, samples_path, out, EXTRACTION, smoke_config["prompt"], "cpu", "s")


def test_extraction_stores_every_row_of_every_layer(kv_gemma, gemma, samples, smoke_config):
    root, manifest = kv_gemma
    lengths = [len(build_prompt(gemma.tokenizer, smoke_config["prompt"], r.context, r.question)) for r in samples.itertuples()]
    assert min(lengths) > SLIDING_WINDOW
    assert manifest["layers"] == [0, 1, 2] and manifest["rows_per_layer"] == sum(lengths)
    for layer in manifest["layers"]:
        assert kvstore.read_layer(root, layer).num_rows == sum(lengths)


def test_extracted_pre_rope_keys_are_the_k_norm_output(kv_gemma, gemma, samples, smoke_config):
    root, manifest = kv_gemma
    tables = {layer: kvstore.read_layer(root, layer) for layer in manifest["layers"]}
    for row in samples.itertuples():
        tokens = build_prompt(gemma.tokenizer, smoke_config["prompt"], row.context, row.question)
        with _seen(gemma) as seen, torch.no_grad():
            gemma.model(torch.as_tensor(tokens.input_ids)[None])
        positions = torch.arange(len(tokens))
        for layer, table in tables.items():
            mine = table.filter(table.column("sample_idx").to_numpy() == row.sample_idx)
            k_norm = seen["k_norm"][layer]
            np.testing.assert_allclose(kvstore.matrix(mine, "key_pre_rope"), _as_rows(k_norm[0]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(kvstore.matrix(mine, "key"), _as_rows(_model_rope(gemma, k_norm, positions, layer)[0]),
                                       rtol=1e-5, atol=1e-5)

"""SnapKV's `kvpress` protocol: kept positions and answers against NVIDIA kvpress itself (bench environment), and
its own rules (every environment)."""

import numpy as np
import pytest
import torch
from conftest import press_kept

from kvpipe.data.prompt import build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.scoring.methods import ScoringInputs, SnapKV, top_n
from kvpipe.scoring.snapkv_kvpress import kvpress_budget

WINDOW, KERNEL = 16, 5
RETENTIONS = [0.02, 0.1, 0.25, 0.5, 0.75, 0.9]


@pytest.fixture(scope="module")
def prompts(tiny_main, samples, smoke_config):
    return [build_prompt(tiny_main.tokenizer, smoke_config["prompt"], r.context, r.question) for r in samples.itertuples()]


def _kvpipe_kept(lm, tokens, retention):
    session = Session(lm, tokens, WINDOW)
    snap = SnapKV(window=WINDOW, kernel=KERNEL, pooling="avg", protocol="kvpress")
    k = kvpress_budget(retention, tokens.context_end)
    return session, top_n(snap.head_scores(ScoringInputs.from_session(session, 0), k), k)


def test_kvpress_protocol_rules(tiny_main, prompts):
    tokens = prompts[0]
    session, kept = _kvpipe_kept(tiny_main, tokens, 0.25)
    prefix = tokens.context_end
    assert kept.shape[-1] == int(0.25 * prefix) and (kept < prefix).all()
    window = np.arange(prefix - WINDOW, prefix)
    assert all(set(window) <= set(row) for row in kept.reshape(-1, kept.shape[-1]))  # the window is always kept
    assert (kept < tokens.context_start).any()  # template tokens are candidates
    (answer,) = session.answer([AnswerRequest("p", kept, keep_template=False)], 2)
    assert answer.kept == kept.shape[-1]  # the template is not added back
    _, small = _kvpipe_kept(tiny_main, tokens, 0.02)  # budget below the window
    assert small.shape[-1] == int(0.02 * prefix) < WINDOW and (small >= prefix - WINDOW).all()
    with pytest.raises(KvpipeError, match="protocol kvpress is kvpress's SnapKVPress"):
        SnapKV(pooling="max", protocol="kvpress")
    with pytest.raises(KvpipeError, match="needs 400 window queries"):
        SnapKV(window=400, pooling="avg", protocol="kvpress").head_scores(ScoringInputs.from_session(session, 0), 10)


def _kvpress_kept(lm, tokens, retention):
    """Per layer and KV head, the prefix positions kvpress keeps: ScorerPress.compress's own topk of its scores."""
    from kvpress import SnapKVPress

    press = SnapKVPress(compression_ratio=1 - retention, window_size=WINDOW, kernel_size=KERNEL)
    return press_kept(lm, press, tokens)


def test_kept_positions_equal_kvpress_per_layer_and_head(tiny_main, prompts):
    pytest.importorskip("kvpress", reason="kvpress is not installed (the bench environment: pip install '.[bench]')")
    for tokens in prompts:
        for r in RETENTIONS:
            _, ours = _kvpipe_kept(tiny_main, tokens, r)
            np.testing.assert_array_equal(ours, _kvpress_kept(tiny_main, tokens, r), err_msg=f"retention {r}")


def test_answers_equal_kvpress_pipeline(tiny_main, prompts):
    pytest.importorskip("kvpress", reason="kvpress is not installed (the bench environment: pip install '.[bench]')")
    from kvpress import SnapKVPress
    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=tiny_main.model, tokenizer=tiny_main.tokenizer, device="cpu")
    for tokens in prompts[:3]:
        session, kept = _kvpipe_kept(tiny_main, tokens, 0.5)
        (ours,) = session.answer([AnswerRequest("p", kept, keep_template=False)], 6)
        ids = torch.as_tensor(tokens.input_ids)[None]
        inputs = {"context_ids": ids[:, : tokens.context_end], "questions_ids": [ids[:, tokens.context_end :]]}
        press = SnapKVPress(compression_ratio=0.5, window_size=WINDOW, kernel_size=KERNEL)
        (theirs,) = pipe.forward(inputs, press=press, max_new_tokens=6)
        assert ours.text == theirs.strip()

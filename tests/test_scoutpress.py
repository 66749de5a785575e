"""kvpipe.kvpress.ScoutPress: against kvpress's own SnapKVPress and kvpipe's own answering (bench environment), and its
import error where kvpress is missing (every environment)."""

import importlib
import sys

import numpy as np
import pytest
import torch
from conftest import press_kept

from kvpipe.data.prompt import build_prompt
from kvpipe.inference.requests import AnswerRequest
from kvpipe.inference.session import Session
from kvpipe.models.load import load_model
from kvpipe.scoring.methods import top_n
from kvpipe.scoring.snapkv_kvpress import kvpress_budget

WINDOW, KERNEL = 16, 5
NEEDS_KVPRESS = "kvpress is not installed (the bench environment: pip install '.[bench]')"


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # as if kvpress were not installed
    monkeypatch.delitem(sys.modules, "kvpipe.kvpress", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'kvpipe\[kvpress\]'"):
        importlib.import_module("kvpipe.kvpress")


@pytest.fixture(scope="module")
def prompts(tiny_main, samples, smoke_config):
    return [build_prompt(tiny_main.tokenizer, smoke_config["prompt"], r.context, r.question) for r in samples.itertuples()]


def test_scout_equal_to_main_keeps_what_snapkvpress_keeps(tiny_main, prompts):
    pytest.importorskip("kvpress", reason=NEEDS_KVPRESS)
    from kvpress import SnapKVPress

    from kvpipe.kvpress import ScoutPress

    for tokens in prompts[:3]:
        for ratio in (0.25, 0.5, 0.9):
            ours = ScoutPress(scout=tiny_main, compression_ratio=ratio, per_head=True, window=WINDOW, kernel=KERNEL)
            theirs = SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)
            np.testing.assert_array_equal(press_kept(tiny_main, ours, tokens), press_kept(tiny_main, theirs, tokens))


def test_a_different_scout_changes_the_kept_set(tiny_main, model_dirs, prompts):
    pytest.importorskip("kvpress", reason=NEEDS_KVPRESS)
    from kvpipe.kvpress import ScoutPress

    tokens = prompts[0]
    kept = {}
    for slug in ("tiny-main", "tiny-scout", "tiny-llama"):  # the llama reads the text with its own tokenizer
        scout = load_model(model_dirs[slug], "cpu", "float32")
        press = ScoutPress(scout=scout, compression_ratio=0.5, tokenizer=tiny_main.tokenizer, window=WINDOW)
        kept[slug] = press_kept(tiny_main, press, tokens)
        assert kept[slug].shape[-1] == int(0.5 * tokens.context_end)
        assert (kept[slug] == kept[slug][:1, :1]).all()  # shared: the same positions in every layer and head
    assert not np.array_equal(kept["tiny-main"], kept["tiny-scout"])
    assert not np.array_equal(kept["tiny-main"], kept["tiny-llama"])


def test_answers_through_kvpress_equal_kvpipe_own_scout_selection(tiny_main, model_dirs, prompts, samples):
    pytest.importorskip("kvpress", reason=NEEDS_KVPRESS)
    from transformers import pipeline

    from kvpipe.kvpress import ScoutPress

    scout = load_model(model_dirs["tiny-scout"], "cpu", "float32")
    pipe = pipeline("kv-press-text-generation", model=tiny_main.model, tokenizer=tiny_main.tokenizer, device="cpu")
    for tokens, question in zip(prompts[:3], samples["question"]):
        press = ScoutPress(scout=scout, method="q2c", question=question, compression_ratio=0.5)
        ids = torch.as_tensor(tokens.input_ids)[None]
        inputs = {"context_ids": ids[:, : tokens.context_end], "questions_ids": [ids[:, tokens.context_end :]]}
        (theirs,) = pipe.forward(inputs, press=press, max_new_tokens=6)
        # kvpipe's own: the main prefills itself and keeps the scout's selection of the prefix, the template evictable
        scores = press.scout_scores(tokens.input_ids[: tokens.context_end].tolist()).numpy()
        selection = top_n(scores, kvpress_budget(0.5, tokens.context_end))
        (ours,) = Session(tiny_main, tokens).answer([AnswerRequest("scout", selection, keep_template=False)], 6)
        assert ours.text == theirs.strip()

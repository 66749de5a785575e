import numpy as np
import pytest

from kvpipe.data.prompt import CONTEXT, QUESTION, TEMPLATE, build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.models.load import load_tokenizer


@pytest.mark.parametrize("model", ["tiny-main", "tiny-llama"])
def test_segments_are_contiguous_and_cover_the_context(model, model_dirs, smoke_config, samples):
    tok = load_tokenizer(model_dirs[model])
    row = samples.iloc[0]
    p = build_prompt(tok, smoke_config["prompt"], row["context"], row["question"])
    ctx = np.flatnonzero(p.segment == CONTEXT)
    assert (ctx == np.arange(p.context_start, p.context_end)).all()
    assert (np.flatnonzero(p.segment == QUESTION) > p.context_end - 1).all()
    assert p.segment[0] == TEMPLATE and p.segment[-1] == TEMPLATE
    assert tok.decode(p.input_ids[p.context_start:p.context_end]).strip() == row["context"]
    question = tok.decode(p.input_ids[p.segment == QUESTION]).strip()
    assert question == row["question"]
    # character offsets tile the context and locate the answer
    assert p.char_start[p.context_start] == 0 and p.char_end[p.context_end - 1] == len(row["context"])
    ans = row["answers"][0]
    covering = (p.char_start <= ans["answer_start"]) & (p.char_end > ans["answer_start"])
    assert covering.sum() == 1 and p.segment[covering][0] == CONTEXT
    # the whole prompt is what the chat template renders, tokenised once
    full = tok.apply_chat_template([{"role": "system", "content": smoke_config["prompt"]["system"]},
                                    {"role": "user", "content": smoke_config["prompt"]["user"].replace(
                                        "{context}", row["context"]).replace("{question}", row["question"])}],
                                   add_generation_prompt=True, tokenize=True)
    assert list(p.input_ids) == list(full)


def test_adjacent_context_and_question_are_refused(model_dirs):
    tok = load_tokenizer(model_dirs["tiny-main"])
    with pytest.raises(KvpipeError, match="prompt.user: context and question tokens overlap"):
        build_prompt(tok, {"system": "s", "user": "{context}{question}"}, "the capi", "tal")

"""The synthetic set's long-context mode: passage lengths, unique-span answers, question kinds, determinism."""

import pandas as pd
import pytest

from kvpipe.config import validate
from kvpipe.data.sampling import load_dataset
from kvpipe.data.synthetic import generate
from kvpipe.errors import KvpipeError

LENGTH = 3000


@pytest.fixture(scope="module")
def long_set() -> pd.DataFrame:
    return generate(seed=1, passages=3, entities_per_passage=5, unanswerable_fraction=0.2, mode="long", length=LENGTH)


def test_passages_reach_the_length_and_answers_are_unique_spans(long_set):
    assert (long_set["context"].str.len() >= LENGTH).all()
    assert long_set["context"].str.len().max() < 1.5 * LENGTH  # close to the setting, not a multiple of it
    answerable = long_set[~long_set["is_impossible"]]
    assert len(answerable) > 0
    for row in answerable.itertuples():
        (answer,) = row.answers
        start = answer["answer_start"]
        assert row.context[start : start + len(answer["text"])] == answer["text"]
        assert row.context.lower().count(answer["text"].lower()) == 1


def test_a_needle_then_multihop_chains_per_passage(long_set):
    for _, passage in long_set.groupby("title"):
        assert passage["hops"].tolist()[0] == 1 and set(passage["hops"].tolist()[1:]) <= {2, 3}
        assert len(passage) == 5
    chains = long_set[long_set["hops"] > 1]
    assert chains["question"].str.contains("'s (?:mentor|employer)").all()
    assert long_set["is_impossible"].any() and (long_set.loc[long_set["is_impossible"], "answers"].map(len) == 0).all()
    longer = generate(seed=1, passages=1, entities_per_passage=2, mode="long", length=2 * LENGTH)
    assert longer["context"].str.len().min() >= 2 * LENGTH


def test_deterministic_per_seed(long_set):
    again = generate(seed=1, passages=3, entities_per_passage=5, unanswerable_fraction=0.2, mode="long", length=LENGTH)
    pd.testing.assert_frame_equal(long_set, again)
    other = generate(seed=2, passages=3, entities_per_passage=5, unanswerable_fraction=0.2, mode="long", length=LENGTH)
    assert not long_set["context"].equals(other["context"])


def test_settings_belong_to_their_mode(smoke_config):
    with pytest.raises(KvpipeError, match="length: only with mode: long"):
        generate(mode="single", length=LENGTH)
    with pytest.raises(KvpipeError, match="bridge: only with mode: multihop"):
        generate(mode="long", bridge=True)
    with pytest.raises(KvpipeError, match="hops"):
        generate(mode="long", hops=[4], length=LENGTH)
    spec = {"source": "synthetic", "mode": "long", "length": LENGTH, "passages": 1}
    config = validate(smoke_config | {"datasets": smoke_config["datasets"] | {"long": spec}})
    loaded = load_dataset("long", config["datasets"]["long"])  # the config's settings reach the generator
    assert len(loaded) == config["datasets"]["long"]["entities_per_passage"] and loaded["context"].str.len().min() >= LENGTH
    with pytest.raises(KvpipeError, match="datasets.long: 'mode' is a required property"):
        validate(smoke_config | {"datasets": {"long": {"source": "synthetic", "length": LENGTH}}})

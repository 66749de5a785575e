import json
import re

import pandas as pd
import pytest

from kvpipe.data.qa_metrics import score_prediction
from kvpipe.data.sampling import sample
from kvpipe.data.squad import load_squad
from kvpipe.data.synthetic import generate
from kvpipe.errors import KvpipeError
from kvpipe.models.load import load_tokenizer


def _official(qas, context="Paris is the capital of France."):
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_official_json_roundtrip(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_official([
        {"id": "a", "question": "Capital of France?", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
        {"id": "b", "question": "Capital of Mars?", "answers": [], "is_impossible": True},
    ])))
    frame = load_squad(str(path))
    assert list(frame["id"]) == ["a", "b"]
    assert frame.loc[0, "answers"] == [{"text": "Paris", "answer_start": 0}]
    assert list(frame["is_impossible"]) == [False, True]


@pytest.mark.parametrize("doc, expected", [
    ({"version": "v2.0"}, "<top level>: missing 'data'"),
    (_official([{"id": "a", "answers": []}]), "data[0].paragraphs[0].qas[0]: missing 'question'"),
    (_official([{"id": "a", "question": "q", "answers": [{"text": "Rome", "answer_start": 0}]}]),
     "data[0].paragraphs[0].qas[0].answers[0]: answer_start 0 does not point at 'Rome'"),
    (_official([{"id": "a", "question": "q", "answers": [], "is_impossible": False}]), "is_impossible=False but 0 answers"),
])
def test_malformed_squad_names_file_and_entry(tmp_path, doc, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(KvpipeError) as info:
        load_squad(str(path))
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_unreadable_squad_files(tmp_path):
    with pytest.raises(KvpipeError, match="SQuAD file not found"):
        load_squad(str(tmp_path / "missing.json"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(KvpipeError, match="x.json: not valid JSON"):
        load_squad(str(tmp_path / "x.json"))


def test_hub_style_parquet(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b"], "title": ["T", "T"], "context": ["Paris is big."] * 2,
                          "question": ["q1", "q2"],
                          "answers": [{"text": ["Paris"], "answer_start": [0]}, {"text": [], "answer_start": []}]})
    frame.to_parquet(tmp_path / "s.parquet")
    out = load_squad(str(tmp_path / "s.parquet"))
    assert out.loc[0, "answers"] == [{"text": "Paris", "answer_start": 0}]
    assert list(out["is_impossible"]) == [False, True]


def _answer(context, text, at=None):
    return {"text": text, "answer_start": context.index(at or text)}


def _official_squad_v2():
    """An official-format SQuAD v2 document: data -> paragraphs -> qas, with unanswerable questions carrying
    plausible_answers, several gold answers per question, and gold answers that normalise to empty."""
    normans = "The Normans were the people who gave their name to Normandy, a region in France."
    rollo = "Rollo was a Viking leader. The Duchy of Normandy was founded in 911 by treaty with the king."
    chemistry = "Oxygen is a chemical element. It is the third most abundant element in the universe."
    return {"version": "v2.0", "data": [
        {"title": "Normans", "paragraphs": [
            {"context": normans, "qas": [
                {"id": "n1", "question": "In what country is Normandy located?", "is_impossible": False,
                 "answers": [_answer(normans, "France"), _answer(normans, "France"), _answer(normans, "in France")]},
                {"id": "n2", "question": "Who gave their name to Normandy in the 1000s?", "is_impossible": True,
                 "answers": [], "plausible_answers": [_answer(normans, "The Normans")]},
                {"id": "n3", "question": "What kind of place is Normandy?", "is_impossible": False,
                 "answers": [_answer(normans, "a", "a region"), _answer(normans, "a region")]},  # "a" normalises to empty
            ]},
            {"context": rollo, "qas": [
                {"id": "r1", "question": "When was the Duchy of Normandy founded?", "is_impossible": False,
                 "answers": [_answer(rollo, "911"), _answer(rollo, "in 911")]},
                {"id": "r2", "question": "Which article begins the second sentence?", "is_impossible": False,
                 "answers": [_answer(rollo, "The")]},                 # only gold answer normalises to empty
            ]},
        ]},
        {"title": "Oxygen", "paragraphs": [{"context": chemistry, "qas": [
            {"id": "o1", "question": "What is the most abundant element?", "is_impossible": True, "answers": [],
             "plausible_answers": [_answer(chemistry, "Oxygen")]},
        ]}]},
    ]}


def test_official_squad_v2_fixture_loads_and_scores_as_the_official_script(tmp_path, smoke_config, model_dirs):
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(_official_squad_v2()))
    frame = load_squad(str(path)).set_index("id")
    assert list(frame.index) == ["n1", "n2", "n3", "r1", "r2", "o1"]
    assert list(frame["title"]) == ["Normans"] * 5 + ["Oxygen"]
    assert frame["is_impossible"].tolist() == [False, True, False, False, False, True]
    assert frame.loc["n2", "answers"] == [] and frame.loc["o1", "answers"] == []   # plausible answers are not gold
    for row in frame[~frame["is_impossible"]].itertuples():
        for ans in row.answers:
            assert row.context[ans["answer_start"]:ans["answer_start"] + len(ans["text"])] == ans["text"]
    golds = frame["answers"]
    assert score_prediction("Normans", golds["n2"])[1:] == (0.0, 0.0)   # unanswerable: only the empty answer scores
    assert score_prediction("unanswerable", golds["o1"])[1:] == (1.0, 1.0)
    assert score_prediction("a region", golds["n3"])[1:] == (1.0, 1.0)
    assert score_prediction("", golds["n3"])[1:] == (0.0, 0.0)          # gold "a" dropped: not matched by ""
    assert score_prediction("", golds["r2"])[1:] == (1.0, 1.0)          # nothing left: scored as unanswerable
    assert score_prediction("The", golds["r2"])[1:] == (1.0, 1.0)       # "The" normalises to the empty answer
    tok = [load_tokenizer(model_dirs["tiny-main"])]
    sampled = sample(frame.reset_index(), tok, smoke_config["prompt"],
                     dict(n=6, seed=0, answerable_only=False, max_context_tokens=4096))
    assert sorted(sampled["id"]) == sorted(frame.index)
    assert sampled.groupby("title")["passage"].nunique().to_dict() == {"Normans": 2, "Oxygen": 1}


def test_synthetic_is_deterministic_with_unique_answer_spans():
    a, b = generate(seed=3, passages=20), generate(seed=3, passages=20)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(seed=4, passages=20)["context"].equals(a["context"])
    for row in a.itertuples():
        ans = row.answers[0]
        assert row.context[ans["answer_start"]:ans["answer_start"] + len(ans["text"])] == ans["text"]
        assert row.context.count(ans["text"]) == 1  # dropping its tokens loses the answer
    assert len(a) == 20 * 4 and a["id"].is_unique


def test_synthetic_unanswerable_questions_name_absent_entities():
    frame = generate(seed=0, passages=50, unanswerable_fraction=0.5)
    impossible = frame[frame["is_impossible"]]
    assert 0.3 < len(impossible) / len(frame) < 0.7
    for row in impossible.itertuples():
        assert row.answers == []
        (name,) = re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", row.question)
        assert name not in row.context


def test_sampling_is_seeded_and_order_invariant(smoke_config, model_dirs):
    tok = [load_tokenizer(model_dirs["tiny-main"])]
    examples = generate(seed=0, passages=10, unanswerable_fraction=0.3)
    cfg = dict(n=5, seed=1, answerable_only=True, max_context_tokens=4096)
    first = sample(examples, tok, smoke_config["prompt"], cfg)
    again = sample(examples.sample(frac=1, random_state=9), tok, smoke_config["prompt"], cfg)
    pd.testing.assert_frame_equal(first, again)
    assert not first["is_impossible"].any()
    assert list(first["sample_idx"]) == list(range(5))
    other = sample(examples, tok, smoke_config["prompt"], cfg | {"seed": 2})
    assert list(other["id"]) != list(first["id"])


def test_sampling_length_filter_and_shortfall(smoke_config, model_dirs):
    toks = [load_tokenizer(model_dirs[m]) for m in ("tiny-main", "tiny-llama")]
    examples = generate(seed=0, passages=10)
    limit = int(sorted(sample(examples, toks, smoke_config["prompt"],
                              dict(n=40, seed=0, answerable_only=True, max_context_tokens=10**6))["prompt_tokens"])[20])
    kept = sample(examples, toks, smoke_config["prompt"], dict(n=10, seed=0, answerable_only=True, max_context_tokens=limit))
    assert (kept["prompt_tokens"] <= limit).all()
    with pytest.raises(KvpipeError, match="sampling.n: dataset d has only"):
        sample(examples, toks, smoke_config["prompt"], dict(n=40, seed=0, answerable_only=True, max_context_tokens=limit), "d")


def test_hub_dataset_is_converted(monkeypatch):
    import datasets

    calls = []
    table = datasets.Dataset.from_dict({
        "id": ["a", "b"], "title": ["T", "T"], "context": ["Paris is big.", "Paris is big."], "question": ["q1", "q2"],
        "answers": [{"text": ["Paris"], "answer_start": [0]}, {"text": [], "answer_start": []}]})
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: calls.append((hub_id, split)) or table)
    frame = load_squad(hub_id="rajpurkar/squad_v2", split="validation")
    assert calls == [("rajpurkar/squad_v2", "validation")]
    assert list(frame["is_impossible"]) == [False, True] and frame.loc[0, "answers"][0]["text"] == "Paris"


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    import datasets

    def offline(hub_id, split):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad_v2' on the Hub (LocalEntryNotFoundError)\ndetails")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KvpipeError, match=r"^hub dataset rajpurkar/squad_v2 \(validation\): ConnectionError: Couldn't reach"):
        load_squad(hub_id="rajpurkar/squad_v2")


def test_samples_depend_on_the_named_tokenizer_only_and_carry_passage_ids(tmp_path, smoke_config, model_dirs):
    from kvpipe.data.sampling import sample_to_file

    spec = smoke_config["datasets"]["synthetic-small"]
    a = sample_to_file("d", spec, model_dirs["tiny-scout"], smoke_config["prompt"], smoke_config["sampling"], tmp_path / "a")
    b = sample_to_file("d", spec, str(model_dirs["tiny-scout"]), smoke_config["prompt"], smoke_config["sampling"],
                       tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)
    assert list(pd.read_parquet(tmp_path / "a")["passage"]) == list(a["passage"])
    by_passage = a.groupby("passage")["context"].nunique()
    assert (by_passage == 1).all() and a["passage"].nunique() == a["context"].nunique()


def test_unreachable_hub_tokenizer_is_one_line(monkeypatch):
    import transformers

    from kvpipe.data.sampling import length_tokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(KvpipeError, match=r"^sampling.tokenizer: cannot load tokenizer 'org/tok' \(We couldn't connect"):
        length_tokenizer("org/tok")


def test_gold_answers_that_normalise_to_empty_are_dropped_as_the_official_script_does():
    from kvpipe.data.qa_metrics import gold_texts, score_prediction, squad_exact, squad_f1

    assert gold_texts(["The", "Paris", "a ."]) == ["Paris"]
    assert gold_texts(["the"]) == [""]                       # nothing left: scored as unanswerable
    assert squad_exact("", ["The"]) == 1.0 and squad_f1("Paris", ["The"]) == 0.0
    assert squad_f1("Paris", ["an", "Paris"]) == 1.0
    assert score_prediction("unanswerable", [{"text": "the", "answer_start": 0}])[1:] == (1.0, 1.0)

"""The synthetic generator's multi-hop mode: seeded, unique answer spans, chains that resolve only by composing facts."""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd
import pytest
import yaml
from conftest import REPO, SMOKE

from kvpipe.config import deep_merge, validate
from kvpipe.data.sampling import load_dataset, sample
from kvpipe.data.synthetic import generate
from kvpipe.errors import KvpipeError

MULTIHOP = {"source": "synthetic", "mode": "multihop", "hops": [2, 3], "seed": 0, "passages": 200, "entities_per_passage": 5}

# An independent reader of multi-hop passages: one fact per sentence, (relation, subject, object).
_FACT_PATTERNS = [
    ("mentor", re.compile(r"(.+) was mentored by (.+)")),
    ("employer", re.compile(r"(.+) was employed by (.+)")),
    ("town", re.compile(r"(.+) was born in the town of (.+)")),
    ("year", re.compile(r"(.+) was born in the year (\d{4})")),
    ("org", re.compile(r"(.+) founded the (.+)")),
]
_QUESTION_PATTERNS = [
    ("town", re.compile(r"In which town was (.+) born\?")),
    ("year", re.compile(r"In what year was (.+) born\?")),
    ("org", re.compile(r"What did (.+) found\?")),
]


def read_facts(context: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """relation -> {subject: object}, and the (relation, subject) of each sentence in passage order."""
    facts: dict[str, dict[str, str]] = {rel: {} for rel, _ in _FACT_PATTERNS}
    order = []
    for sentence in re.split(r"(?<=\.) ", context):
        matches = [(rel, m) for rel, pattern in _FACT_PATTERNS if (m := pattern.fullmatch(sentence.removesuffix(".")))]
        assert len(matches) == 1, sentence
        rel, m = matches[0]
        assert m[1] not in facts[rel], f"two {rel} facts about {m[1]}"
        facts[rel][m[1]] = m[2]
        order.append((rel, m[1]))
    return facts, order


def read_question(question: str) -> tuple[str, list[str], str]:
    """(named person, relations to follow in order, attribute asked for) of a question."""
    ((attr, m),) = [(attr, m) for attr, pattern in _QUESTION_PATTERNS if (m := pattern.fullmatch(question))]
    who, outer = m[1], []
    while inner := re.fullmatch(r"the (mentor|employer) of (.+)", who):
        outer.append(inner[1])
        who = inner[2]
    name, first = re.fullmatch(r"(.+)'s (mentor|employer)", who).groups()
    return name, [first, *reversed(outer)], attr


def digest(frame: pd.DataFrame) -> str:
    return hashlib.sha256(json.dumps(frame.to_dict("records"), sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate(seed=0, passages=60, entities_per_passage=5, mode="multihop")


def test_multihop_is_deterministic_per_seed(frame):
    pd.testing.assert_frame_equal(frame, generate(seed=0, passages=60, entities_per_passage=5, mode="multihop"))
    other = generate(seed=1, passages=60, entities_per_passage=5, mode="multihop")
    assert not other["context"].equals(frame["context"]) and not other["question"].equals(frame["question"])
    assert list(frame.columns) == ["id", "title", "context", "question", "answers", "is_impossible", "hops", "shortcut"]
    assert len(frame) == 60 * 5 and frame["id"].is_unique and not frame["is_impossible"].any()


def test_every_answer_is_one_span_of_its_passage(frame):
    for row in frame.itertuples():
        (ans,) = row.answers
        assert row.context[ans["answer_start"] : ans["answer_start"] + len(ans["text"])] == ans["text"]
        assert row.context.lower().count(ans["text"].lower()) == 1


def test_chains_resolve_by_composing_facts_and_shortcuts_are_wrong(frame):
    adjacent = 0
    for row in frame.itertuples():
        facts, order = read_facts(row.context)
        people = set(facts["town"])
        assert all(set(facts[rel]) == people for rel in facts)  # every person has every fact: same-typed distractors
        name, relations, attr = read_question(row.question)
        assert len(relations) + 1 == row.hops and row.id.endswith(f"-h{row.hops}")
        chain = [name]
        for rel in relations:
            chain.append(facts[rel][chain[-1]])
        assert len(set(chain)) == len(chain)  # never back to a person already on the chain
        answer = facts[attr][chain[-1]]
        assert row.answers[0]["text"] == answer
        shortcuts = [facts[attr][person] for person in chain[:-1]]  # the named person's own attribute first
        assert answer not in shortcuts and all(s in row.context for s in shortcuts)
        assert row.shortcut == shortcuts[0]  # the one-hop reading's answer, recorded for error analysis
        last_link = order.index((relations[-1], chain[-2]))
        adjacent += abs(order.index((attr, chain[-1])) - last_link) == 1
    assert adjacent < len(frame) / 4  # sentences are shuffled: the facts of a chain are rarely neighbours


@pytest.mark.parametrize("hops", [[2], [3]])
def test_bridge_questions_start_from_a_person_known_only_by_one_relation(hops):
    frame = generate(seed=4, passages=40, entities_per_passage=4, mode="multihop", hops=hops, bridge=True)
    assert len(frame) == 40 * 4 and frame["shortcut"].isna().all() and set(frame["hops"]) == set(hops)
    for row in frame.itertuples():
        facts, _ = read_facts(row.context)
        members = set(facts["town"])
        name, relations, attr = read_question(row.question)
        assert len(relations) + 1 == row.hops
        assert name not in members and row.context.count(name) == 1  # named once: in its bridge fact
        chain = [name]
        for rel in relations:
            chain.append(facts[rel][chain[-1]])
        assert set(chain[1:]) <= members and len(set(chain)) == len(chain)
        assert row.answers[0]["text"] == facts[attr][chain[-1]]
        (ans,) = row.answers
        assert row.context[ans["answer_start"] : ans["answer_start"] + len(ans["text"])] == ans["text"]
        assert row.context.lower().count(ans["text"].lower()) == 1
    plain = generate(seed=4, passages=40, entities_per_passage=4, mode="multihop", hops=hops)
    assert not plain["context"].isin(frame["context"]).any()


@pytest.mark.parametrize("hops, expected", [([2], {2}), ([3], {3}), ([2, 3], {2, 3}), (None, {2, 3})])
def test_hop_counts_are_those_configured(hops, expected):
    frame = generate(seed=5, passages=30, entities_per_passage=4, mode="multihop", hops=hops)
    assert set(frame["hops"]) == expected
    assert {int(i.rsplit("-h", 1)[1]) for i in frame["id"]} == expected
    if len(expected) == 2:
        assert 0.35 < (frame["hops"] == 2).mean() < 0.65


def test_unanswerable_multihop_questions_name_absent_people():
    frame = generate(seed=2, passages=40, entities_per_passage=4, unanswerable_fraction=0.5, mode="multihop")
    impossible = frame[frame["is_impossible"]]
    assert 0.3 < len(impossible) / len(frame) < 0.7
    for row in impossible.itertuples():
        name, _, _ = read_question(row.question)
        assert row.answers == [] and name not in row.context and pd.isna(row.shortcut)


def test_single_mode_is_unchanged():
    # Digests computed with the generator as it was BEFORE the multi-hop mode was added (same
    # json.dumps of the records): single mode, and so the cached samples of existing configs, is byte-identical.
    expected = {
        "cc83586f9deeece124cbceb1ac5e85dd70d53616c2d5b8af1f4f97994d48ca8a": {},
        "e551933ec6cf9224c91b31c832cc5e681510087e50385bb7a3e783f058257f3f": dict(seed=3, passages=20),
        "3d5fa9098fc1f9ad905b068257bac836d14b5789aa115a70a30bf358a7be7ae4": dict(seed=0, passages=50, unanswerable_fraction=0.5),
        "cd68215d9f34cc475a57734970464c048fe0a609e934b7edb87b16fb78eab78c": dict(
            seed=7, passages=30, entities_per_passage=6, unanswerable_fraction=0.2
        ),
    }
    for value, kwargs in expected.items():
        assert digest(generate(**kwargs)) == value, kwargs
    assert digest(generate(mode="single")) == "cc83586f9deeece124cbceb1ac5e85dd70d53616c2d5b8af1f4f97994d48ca8a"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(mode="chain"), "mode: 'chain' is not a synthetic mode"),
        (dict(mode="multihop", hops=[4]), "hops: [4] must be"),
        (dict(mode="multihop", hops=[]), "hops: [] must be"),
        (dict(mode="multihop", entities_per_passage=2), "entities_per_passage: multihop needs at least 3"),
        (dict(hops=[2]), "hops: only with mode: multihop"),
        (dict(bridge=True), "bridge: only with mode: multihop"),
    ],
)
def test_generator_arguments_are_checked(kwargs, expected):
    with pytest.raises(KvpipeError, match=f"^{re.escape(expected)}"):
        generate(passages=1, **kwargs)


@pytest.fixture
def base() -> dict:
    return deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()), yaml.safe_load(SMOKE.read_text()))


def test_config_example_validates_and_dispatches(base):
    line = next(l for l in (REPO / "config.yaml").read_text().splitlines() if l.strip().startswith("# multihop:"))
    assert yaml.safe_load(line.strip().removeprefix("# ")) == {"multihop": MULTIHOP}  # the commented example
    cfg = validate(deep_merge(base, {"datasets": {"multihop": MULTIHOP | {"passages": 3}}}))
    assert "mode" not in cfg["datasets"]["synthetic-small"] and "hops" not in cfg["datasets"]["synthetic-small"]
    frame = load_dataset("multihop", cfg["datasets"]["multihop"])
    pd.testing.assert_frame_equal(frame, generate(0, 3, 5, mode="multihop", hops=[2, 3]))
    bridged = validate(deep_merge(base, {"datasets": {"multihop": MULTIHOP | {"passages": 3, "bridge": True}}}))
    pd.testing.assert_frame_equal(load_dataset("multihop", bridged["datasets"]["multihop"]),
                                  generate(0, 3, 5, mode="multihop", hops=[2, 3], bridge=True))
    single = load_dataset("synthetic-small", cfg["datasets"]["synthetic-small"])
    assert list(single.columns) == ["id", "title", "context", "question", "answers", "is_impossible"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"mode": "chain"}, "datasets.mh.mode: 'chain' is not one of ['single', 'multihop', 'long']"),
        ({"mode": "multihop", "hops": [4]}, "datasets.mh.hops.0: 4 is not one of [2, 3]"),
        ({"mode": "multihop", "hops": []}, "datasets.mh.hops: [] should be non-empty"),
        ({"mode": "multihop", "hops": [2, 2]}, "datasets.mh.hops: [2, 2] has non-unique elements"),
        ({"mode": "multihop", "entities_per_passage": 2}, "datasets.mh.entities_per_passage: 2 is less than the minimum of 3"),
        ({"mode": "single", "hops": [2]}, "datasets.mh.mode: 'single' is not one of ['multihop', 'long']"),
        ({"hops": [2]}, "datasets.mh: 'mode' is a required property"),
        ({"mode": "single", "bridge": True}, "datasets.mh.mode: 'multihop' was expected"),
        ({"mode": "multihop", "bridge": "yes"}, "datasets.mh.bridge: 'yes' is not of type 'boolean'"),
    ],
)
def test_schema_errors_name_the_field(base, spec, expected):
    with pytest.raises(KvpipeError) as info:
        validate(deep_merge(base, {"datasets": {"mh": {"source": "synthetic", **spec}}}))
    assert str(info.value) == f"config: {expected}" and "\n" not in str(info.value)


def test_sampling_keeps_the_hops_column(smoke_config, model_dirs):
    from kvpipe.models.load import load_tokenizer

    examples = generate(seed=0, passages=10, entities_per_passage=4, mode="multihop")
    tok = [load_tokenizer(model_dirs["tiny-main"])]
    out = sample(examples, tok, smoke_config["prompt"], dict(n=8, seed=0, answerable_only=True, max_context_tokens=4096))
    assert out["hops"].isin([2, 3]).all()
    assert (out.set_index("id")["hops"] == examples.set_index("id").loc[out["id"], "hops"]).all()

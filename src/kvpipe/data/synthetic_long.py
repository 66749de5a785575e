"""The synthetic set's long-context mode: passages of at least `length` characters, each a crowd of invented people.

Every person has a birth town, a birth year and a founded organisation and is linked to two
other people (mentor, employer), one sentence per fact, all shuffled; people are added until the
passage reaches `length` characters (13,000 by default: above 4,000 tokens for the Qwen2.5 and
Llama tokenizers, as the invented names split into many tokens). Per passage, the first question
is a needle (an attribute of one named person among dozens of same-typed facts), the others
follow multi-hop chains (``hops`` facts, as in the multi-hop mode: "In which town was the mentor
of X's employer born?"). Only values that occur exactly once in the passage are asked for, so
every answer is a unique span; unanswerable questions ask about a person the passage never names.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd

from kvpipe.data import synthetic
from kvpipe.data.squad import COLUMNS
from kvpipe.errors import KvpipeError

LENGTH = 13_000  # default passage length in characters (above 4,000 Qwen2.5 tokens)


def _person(rng: random.Random, used: set[str]) -> dict:
    word = synthetic._word
    return {
        "name": synthetic._unique(rng, lambda: f"{word(rng, 2)} {word(rng, 3)}", used),
        "town": synthetic._unique(rng, lambda: word(rng, 3), used),
        "year": synthetic._unique(rng, lambda: str(rng.randint(1000, 1999)), used),
        "org": synthetic._unique(rng, lambda: f"{word(rng, 2)} {rng.choice(synthetic._ORG_KINDS)}", used),
    }


def _passage(rng: random.Random, length: int) -> tuple[list[dict], str, dict[tuple[str, str], int]]:
    """People with relations and the shuffled passage of at least `length` characters; the answer start of each
    (name, attribute) whose value occurs once in it."""
    used: set[str] = set()
    people, size = [], 0
    while True:
        while size < length or len(people) < 3:  # the facts, and two relation sentences of about 2 names each
            people.append(_person(rng, used))
            size += sum(len(text) + 1 for text, *_ in _sentences(people[-1:])) + 2 * (2 * len(people[-1]["name"]) + 18)
        context, spans = _shuffled(rng, people)
        if len(context) >= length:
            break
        people.append(_person(rng, used))  # rare: the estimate fell short
    lowered = context.lower()
    return people, context, {key: at for key, (at, value) in spans.items() if lowered.count(value.lower()) == 1}


def _shuffled(rng: random.Random, people: list[dict]) -> tuple[str, dict[tuple[str, str], tuple[int, str]]]:
    """Draw each person's relations, shuffle every sentence; the passage and each (name, attribute)'s (start, value)."""
    for person in people:
        others = [other["name"] for other in people if other is not person]
        for (relation, _), other in zip(synthetic._RELATIONS, rng.sample(others, len(synthetic._RELATIONS))):
            person[relation] = other
    sentences = _sentences(people)
    rng.shuffle(sentences)
    context, spans = "", {}
    for text, value, attr, person in sentences:
        if value is not None:
            spans[(person["name"], attr)] = (len(context) + text.rindex(value), value)
        context += text + " "
    return context.strip(), spans


def _sentences(people: list[dict]) -> list[tuple[str, str | None, str | None, dict]]:
    facts = [(t.format(**p), p[attr], attr, p) for p in people for t, _, attr in synthetic._HOP_FACTS]
    return facts + [
        (t.format(name=p["name"], other=p[rel]), None, None, p) for p in people for rel, t in synthetic._RELATIONS if rel in p
    ]


def generate_long(
    seed: int, passages: int, questions_per_passage: int, unanswerable_fraction: float, hops: Sequence[int], length: int
) -> pd.DataFrame:
    """Long passages with a needle question and multi-hop chain questions each (module docstring)."""
    if any(h not in synthetic.HOPS for h in hops) or not hops:
        raise KvpipeError(f"hops: {list(hops)} must be a non-empty list of hop counts from {list(synthetic.HOPS)}")
    rng = random.Random(seed)
    rows = []
    for p in range(passages):
        people, context, spans = _passage(rng, length)
        by_name = {person["name"]: person for person in people}
        for q in range(questions_per_passage):
            count = 1 if q == 0 else rng.choice(list(hops))
            chains = [
                (person, rels, end, attr)
                for person in people
                for rels, end in synthetic._chains(person, by_name, count - 1)
                for _, _, attr in synthetic._HOP_FACTS
                if (end["name"], attr) in spans
            ]
            person, relations, end, attr = rng.choice(chains)
            question = next(qt for _, qt, a in synthetic._HOP_FACTS if a == attr)
            row = {"id": f"long{seed}-{p:05d}-{q}-h{count}", "title": f"Passage {p}", "context": context, "hops": count}
            if rng.random() < unanswerable_fraction:
                absent = synthetic._unique(rng, lambda: f"{synthetic._word(rng, 2)} {synthetic._word(rng, 3)}", set(by_name))
                rows.append(
                    row | {"question": question.format(who=_who(absent, relations)), "answers": [], "is_impossible": True}
                )
                continue
            rows.append(
                row
                | {
                    "question": question.format(who=_who(person["name"], relations)),
                    "answers": [{"text": end[attr], "answer_start": spans[(end["name"], attr)]}],
                    "is_impossible": False,
                }
            )
    return pd.DataFrame(rows, columns=[*COLUMNS, "hops"])


def _who(name: str, relations: Sequence[str]) -> str:
    """The named person (a needle) or the person reached over the relations from them."""
    return synthetic.chain_phrase(name, relations) if relations else name

"""A deterministic SQuAD-format extractive QA set about invented entities.

Each passage describes several invented people with the same kinds of facts (birthplace,
birth year, profession, workplace, founded organisation), so every question has
same-typed distractors elsewhere in the passage and its answer occurs exactly once: a
selection that drops the answer's tokens loses the answer. Names are made of random
syllables, so no model can answer from memory.

The multi-hop mode links the people of a passage by two relations (mentor, employer) and asks
for an attribute of a person reached only by following them from the named one ("In which
town was the mentor of X's employer born?"): 2 hops compose one relation with one attribute,
3 hops two relations. Every person has every attribute, and the people of a chain are
distinct, so answering with the attribute of the named person (or of any person along the
way) gives a wrong answer of the right type; the named person's own value, the answer of the
one-hop shortcut, is kept in a ``shortcut`` column (missing for unanswerable questions).
With ``bridge`` every question starts instead from a person the passage names only in one
relation fact ("X was mentored by Y."), one per question: X has no attributes, so no one-hop
shortcut exists, and the answer is reached only through the bridge fact (same-typed
distractors remain: every passage member has every attribute).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd

from kvpipe.data.squad import COLUMNS
from kvpipe.errors import KvpipeError

_SYLLABLES = "ka lo mi re vo sa tu ne zi dar mel qua rin tho vel wyn ost ban cor fel".split()
_PROFESSIONS = [
    "glassblower",
    "cartographer",
    "beekeeper",
    "astronomer",
    "shipwright",
    "luthier",
    "botanist",
    "clockmaker",
    "stonemason",
    "archivist",
    "falconer",
    "tanner",
]
_ORG_KINDS = ["Guild", "Society", "Academy", "Company", "League", "Institute"]

# (fact template, question template, attribute holding the answer)
_FACTS = [
    ("{name} was born in the town of {town}.", "In which town was {name} born?", "town"),
    ("{name} was born in the year {year}.", "In what year was {name} born?", "year"),
    ("By trade, {name} was a {profession}.", "What was the trade of {name}?", "profession"),
    ("Later, {name} worked for many years in {city}.", "Where did {name} work for many years?", "city"),
    ("{name} founded the {org}.", "What did {name} found?", "org"),
]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _unique(rng: random.Random, make, used: set[str]) -> str:
    while (value := make()) in used:
        pass
    used.add(value)
    return value


def generate(
    seed: int = 0,
    passages: int = 200,
    entities_per_passage: int = 4,
    unanswerable_fraction: float = 0.0,
    mode: str = "single",
    hops: Sequence[int] | None = None,
    bridge: bool = False,
    length: int | None = None,
) -> pd.DataFrame:
    """Generate passages with one question per entity; unanswerable ones ask about an absent entity.

    mode "single" asks for an attribute of a named person; "multihop" for one of a person reached
    over ``hops`` facts (each question's count drawn from ``hops``, default every supported count;
    recorded in an extra ``hops`` column and as the id's ``-h<k>`` suffix); "long" builds passages of at
    least ``length`` characters with a needle and multi-hop chain questions (kvpipe.data.synthetic_long).
    """
    if mode == "long":   # kvpipe.data.synthetic_long; entities_per_passage counts the questions per passage
        from kvpipe.data.synthetic_long import LENGTH, generate_long

        if bridge:
            raise KvpipeError("bridge: only with mode: multihop")
        return generate_long(seed, passages, entities_per_passage, unanswerable_fraction, HOPS if hops is None else hops,
                             LENGTH if length is None else length)
    if length is not None:
        raise KvpipeError("length: only with mode: long")
    if mode == "multihop":
        return _multihop(seed, passages, entities_per_passage, unanswerable_fraction, HOPS if hops is None else hops,
                         bridge)
    if mode != "single":
        raise KvpipeError(f"mode: {mode!r} is not a synthetic mode (single, multihop, long)")
    if hops is not None:
        raise KvpipeError("hops: only with mode: multihop")
    if bridge:
        raise KvpipeError("bridge: only with mode: multihop")
    return _single(seed, passages, entities_per_passage, unanswerable_fraction)


def _single(seed: int, passages: int, entities_per_passage: int, unanswerable_fraction: float) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for p in range(passages):
        used: set[str] = set()
        people = []
        for _ in range(entities_per_passage):
            people.append(
                {
                    "name": _unique(rng, lambda: f"{_word(rng, 2)} {_word(rng, 3)}", used),
                    "town": _unique(rng, lambda: _word(rng, 3), used),
                    "year": _unique(rng, lambda: str(rng.randint(1400, 1899)), used),
                    "profession": _unique(rng, lambda: rng.choice(_PROFESSIONS), used),
                    "city": _unique(rng, lambda: _word(rng, 2) + " " + rng.choice(["Harbour", "Ford", "Vale"]), used),
                    "org": _unique(rng, lambda: f"{_word(rng, 2)} {rng.choice(_ORG_KINDS)}", used),
                }
            )
        sentences = [(fact, person) for person in people for fact in _FACTS]
        rng.shuffle(sentences)
        context, spans = "", {}
        for (template, _, attr), person in sentences:
            text = template.format(**person)
            value = person[attr]
            spans[(person["name"], attr)] = len(context) + text.index(value)
            context += text + " "
        context = context.strip()
        for e, person in enumerate(people):
            _, question, attr = rng.choice(_FACTS)
            qid = f"syn{seed}-{p:05d}-{e}"
            if rng.random() < unanswerable_fraction:
                absent = _unique(rng, lambda: f"{_word(rng, 2)} {_word(rng, 3)}", used)
                rows.append(
                    {
                        "id": qid,
                        "title": f"Passage {p}",
                        "context": context,
                        "question": question.format(name=absent),
                        "answers": [],
                        "is_impossible": True,
                    }
                )
                continue
            value = person[attr]
            rows.append(
                {
                    "id": qid,
                    "title": f"Passage {p}",
                    "context": context,
                    "question": question.format(name=person["name"]),
                    "answers": [{"text": value, "answer_start": spans[(person["name"], attr)]}],
                    "is_impossible": False,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


# Multi-hop mode. Relations between the people of a passage: (relation, fact template); every person has one of each,
# held by two different other people, so a chain can always go on without turning back.
_RELATIONS = [
    ("mentor", "{name} was mentored by {other}."),
    ("employer", "{name} was employed by {other}."),
]
# The attributes a multi-hop question asks for (each at the end of its fact, and unique in the passage).
_HOP_FACTS = [
    ("{name} was born in the town of {town}.", "In which town was {who} born?", "town"),
    ("{name} was born in the year {year}.", "In what year was {who} born?", "year"),
    ("{name} founded the {org}.", "What did {who} found?", "org"),
]
HOPS = (2, 3)  # the hop counts the multi-hop mode supports: facts composed per question


def chain_phrase(name: str, relations: Sequence[str]) -> str:
    """The person reached from ``name`` over ``relations`` (in order), e.g. "the mentor of X's employer"."""
    who = f"{name}'s {relations[0]}"
    for relation in relations[1:]:
        who = f"the {relation} of {who}"
    return who


def _chains(start: dict, by_name: dict[str, dict], length: int) -> list[tuple[tuple[str, ...], dict]]:
    """Every path of ``length`` relations from ``start`` that visits no person twice: (relations, end)."""
    paths: list[tuple[tuple[str, ...], list[dict]]] = [((), [start])]
    for _ in range(length):
        paths = [
            (rels + (rel,), seen + [by_name[seen[-1][rel]]])
            for rels, seen in paths
            for rel, _ in _RELATIONS
            if all(p is not by_name[seen[-1][rel]] for p in seen)
        ]
    return [(rels, seen[-1]) for rels, seen in paths]


def _multihop_passage(
    rng: random.Random, n: int, bridges: int
) -> tuple[list[dict], list[dict], str, dict[tuple[str, str], int]]:
    """Draw people, relations, ``bridges`` bridge people and the shuffled passage until every answerable value
    occurs once in it. A bridge person has a name, one relation and its target (a passage member), nothing else."""
    while True:
        used: set[str] = set()
        people = [
            {
                "name": _unique(rng, lambda: f"{_word(rng, 2)} {_word(rng, 3)}", used),
                "town": _unique(rng, lambda: _word(rng, 3), used),
                "year": _unique(rng, lambda: str(rng.randint(1400, 1899)), used),
                "org": _unique(rng, lambda: f"{_word(rng, 2)} {rng.choice(_ORG_KINDS)}", used),
            }
            for _ in range(n)
        ]
        for person in people:
            others = [other["name"] for other in people if other is not person]
            for (relation, _), other in zip(_RELATIONS, rng.sample(others, len(_RELATIONS))):
                person[relation] = other
        bridge_people = [
            {
                "name": _unique(rng, lambda: f"{_word(rng, 2)} {_word(rng, 3)}", used),
                "relation": rng.choice(_RELATIONS),
                "target": rng.choice(people)["name"],
            }
            for _ in range(bridges)
        ]
        sentences = [
            (template.format(**person), person[attr], attr, person) for person in people for template, _, attr in _HOP_FACTS
        ]
        sentences += [
            (template.format(name=person["name"], other=person[relation]), None, None, person)
            for person in people
            for relation, template in _RELATIONS
        ]
        sentences += [(b["relation"][1].format(name=b["name"], other=b["target"]), None, None, b) for b in bridge_people]
        rng.shuffle(sentences)
        context, spans = "", {}
        for text, value, attr, person in sentences:
            if value is not None:
                spans[(person["name"], attr)] = len(context) + text.rindex(value)
            context += text + " "
        context = context.strip()
        lowered = context.lower()
        if all(lowered.count(person[attr].lower()) == 1 for person in people for _, _, attr in _HOP_FACTS):
            return people, bridge_people, context, spans


def _multihop(
    seed: int, passages: int, entities_per_passage: int, unanswerable_fraction: float, hops: Sequence[int], bridge: bool
) -> pd.DataFrame:
    hops = list(hops)
    if not hops or any(h not in HOPS for h in hops):
        raise KvpipeError(f"hops: {hops} must be a non-empty list of hop counts from {list(HOPS)}")
    if entities_per_passage < 3:
        raise KvpipeError(f"entities_per_passage: multihop needs at least 3 people per passage (got {entities_per_passage})")
    rng = random.Random(seed)
    rows = []
    for p in range(passages):
        people, bridges, context, spans = _multihop_passage(rng, entities_per_passage, entities_per_passage * bridge)
        by_name = {person["name"]: person for person in people}
        for e, person in enumerate(bridges or people):
            count = rng.choice(hops)
            if bridge:   # the bridge fact is the first hop; the chain goes on from its target
                relations, end = rng.choice(_chains(by_name[person["target"]], by_name, count - 2))
                relations = (person["relation"][0], *relations)
            else:
                relations, end = rng.choice(_chains(person, by_name, count - 1))
            _, question, attr = rng.choice(_HOP_FACTS)
            row = {"id": f"mh{seed}-{p:05d}-{e}-h{count}", "title": f"Passage {p}", "context": context, "hops": count}
            if rng.random() < unanswerable_fraction:
                absent = _unique(rng, lambda: f"{_word(rng, 2)} {_word(rng, 3)}", set(by_name) | {b["name"] for b in bridges})
                rows.append(
                    row
                    | {"question": question.format(who=chain_phrase(absent, relations)), "answers": [], "is_impossible": True,
                       "shortcut": None}
                )
                continue
            rows.append(
                row
                | {
                    "question": question.format(who=chain_phrase(person["name"], relations)),
                    "answers": [{"text": end[attr], "answer_start": spans[(end["name"], attr)]}],
                    "is_impossible": False,
                    "shortcut": None if bridge else person[attr],
                }
            )
    return pd.DataFrame(rows, columns=[*COLUMNS, "hops", "shortcut"])

"""A deterministic SQuAD-format extractive QA set about invented entities.

Each passage describes several invented people with the same kinds of facts (birthplace,
birth year, profession, workplace, founded organisation), so every question has
same-typed distractors elsewhere in the passage and its answer occurs exactly once: a
selection that drops the answer's tokens loses the answer. Names are made of random
syllables, so no model can answer from memory.
"""

from __future__ import annotations

import random

import pandas as pd

from kvpipe.data.squad import COLUMNS

_SYLLABLES = "ka lo mi re vo sa tu ne zi dar mel qua rin tho vel wyn ost ban cor fel".split()
_PROFESSIONS = ["glassblower", "cartographer", "beekeeper", "astronomer", "shipwright", "luthier",
                "botanist", "clockmaker", "stonemason", "archivist", "falconer", "tanner"]
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


def generate(seed: int = 0, passages: int = 200, entities_per_passage: int = 4,
             unanswerable_fraction: float = 0.0) -> pd.DataFrame:
    """Generate passages with one question per entity; unanswerable ones ask about an absent entity."""
    rng = random.Random(seed)
    rows = []
    for p in range(passages):
        used: set[str] = set()
        people = []
        for _ in range(entities_per_passage):
            people.append({
                "name": _unique(rng, lambda: f"{_word(rng, 2)} {_word(rng, 3)}", used),
                "town": _unique(rng, lambda: _word(rng, 3), used),
                "year": _unique(rng, lambda: str(rng.randint(1400, 1899)), used),
                "profession": _unique(rng, lambda: rng.choice(_PROFESSIONS), used),
                "city": _unique(rng, lambda: _word(rng, 2) + " " + rng.choice(["Harbour", "Ford", "Vale"]), used),
                "org": _unique(rng, lambda: f"{_word(rng, 2)} {rng.choice(_ORG_KINDS)}", used),
            })
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
                rows.append({"id": qid, "title": f"Passage {p}", "context": context,
                             "question": question.format(name=absent), "answers": [], "is_impossible": True})
                continue
            value = person[attr]
            rows.append({"id": qid, "title": f"Passage {p}", "context": context,
                         "question": question.format(name=person["name"]),
                         "answers": [{"text": value, "answer_start": spans[(person["name"], attr)]}],
                         "is_impossible": False})
    return pd.DataFrame(rows, columns=COLUMNS)

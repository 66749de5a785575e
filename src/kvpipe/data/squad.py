"""Read SQuAD v2 (official JSON, hub-style Parquet/JSONL, or the hub itself) into one table.

The table has one row per question: id, title, context, question, answers (a list of
{text, answer_start}) and is_impossible. Every structural problem in a file is reported
with the file name and the JSON path of the offending entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kvpipe.errors import KvpipeError

COLUMNS = ["id", "title", "context", "question", "answers", "is_impossible"]


def _require(obj: Any, key: str, kind: type, where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise KvpipeError(f"{path}: {where}: missing '{key}'")
    if not isinstance(obj[key], kind):
        raise KvpipeError(f"{path}: {where}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _from_official(doc: Any, path: Path) -> pd.DataFrame:
    rows = []
    for a, article in enumerate(_require(doc, "data", list, "<top level>", path)):
        title = _require(article, "title", str, f"data[{a}]", path)
        for p, para in enumerate(_require(article, "paragraphs", list, f"data[{a}]", path)):
            where = f"data[{a}].paragraphs[{p}]"
            context = _require(para, "context", str, where, path)
            for q, qa in enumerate(_require(para, "qas", list, where, path)):
                qwhere = f"{where}.qas[{q}]"
                answers = []
                for i, ans in enumerate(_require(qa, "answers", list, qwhere, path)):
                    text = _require(ans, "text", str, f"{qwhere}.answers[{i}]", path)
                    start = _require(ans, "answer_start", int, f"{qwhere}.answers[{i}]", path)
                    if context[start : start + len(text)] != text:
                        raise KvpipeError(f"{path}: {qwhere}.answers[{i}]: answer_start {start} does not point at {text!r}")
                    answers.append({"text": text, "answer_start": start})
                impossible = bool(qa.get("is_impossible", not answers))
                if impossible == bool(answers):
                    raise KvpipeError(f"{path}: {qwhere}: is_impossible={impossible} but {len(answers)} answers given")
                rows.append({"id": _require(qa, "id", str, qwhere, path), "title": title, "context": context,
                             "question": _require(qa, "question", str, qwhere, path),
                             "answers": answers, "is_impossible": impossible})
    if not rows:
        raise KvpipeError(f"{path}: contains no questions")
    return pd.DataFrame(rows, columns=COLUMNS)


def _from_hub_columns(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = {"id", "title", "context", "question", "answers"} - set(frame.columns)
    if missing:
        raise KvpipeError(f"{where}: missing columns {', '.join(sorted(missing))}")

    def convert(ans: Any) -> list[dict[str, Any]]:
        texts, starts = list(ans["text"]), list(ans["answer_start"])
        return [{"text": str(t), "answer_start": int(s)} for t, s in zip(texts, starts, strict=True)]

    out = frame[["id", "title", "context", "question"]].copy()
    out["answers"] = [convert(a) for a in frame["answers"]]
    out["is_impossible"] = [not a for a in out["answers"]]
    return out.reset_index(drop=True)


def load_squad(path: str | None = None, hub_id: str | None = None, split: str = "validation") -> pd.DataFrame:
    """Load SQuAD v2 from a local file (official JSON, Parquet or JSONL) or from the hub."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise KvpipeError(f"{file}: SQuAD file not found")
        if file.suffix == ".parquet":
            return _from_hub_columns(pd.read_parquet(file), str(file))
        if file.suffix == ".jsonl":
            return _from_hub_columns(pd.read_json(file, lines=True), str(file))
        try:
            doc = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise KvpipeError(f"{file}: not valid JSON ({err})") from None
        return _from_official(doc, file)
    if not hub_id:
        raise KvpipeError("squad_v2 dataset: give a path or a hub_id")
    from datasets import load_dataset

    try:
        ds = load_dataset(hub_id, split=split)
    except Exception as err:  # the hub client raises many types; report it as one line
        raise KvpipeError(f"hub dataset {hub_id} ({split}): {type(err).__name__}: {str(err).splitlines()[0]}") from None
    return _from_hub_columns(ds.to_pandas(), f"hub dataset {hub_id}")

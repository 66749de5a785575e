"""The gather of the projection stage: its answering chunks' tables one after the other, and the stage's timings."""

from __future__ import annotations

from pathlib import Path

from kvpipe.chunks import concat_tables
from kvpipe.io import read_json, write_json

CHUNK_TABLES = ("answers", "ttft", "timings")  # what an answering chunk writes, row by test sample


def gather(chunks: list[Path], fit_timings: Path, out_dir: Path) -> None:
    """The CHUNK_TABLES of the chunks (directories, in sample order) concatenated under out_dir, and timings.json:
    the fit's phases and times with the chunks' answering seconds added up (answers_s)."""
    for name in CHUNK_TABLES:
        concat_tables([Path(c) / f"{name}.parquet" for c in chunks], Path(out_dir) / f"{name}.parquet")
    timings = read_json(fit_timings)
    answers_s = sum(read_json(Path(c) / "timings.json")["answers_s"] for c in chunks)
    timings["phases"] = timings["phases"] | {"answers_s": round(answers_s, 2)}
    write_json(Path(out_dir) / "timings.json", timings)

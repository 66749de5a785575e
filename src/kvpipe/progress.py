"""Where running jobs are: the last progress line of each recently written job log (`kvpipe progress`).

Under Snakemake a job's stdout and stderr, and so its tqdm bars and the lines of a model download,
go to its log (``results/logs/{rule}/...log``; ``kvpipe.workflow.rule_script``), not to Snakemake's
own output. A tqdm bar in a file is a run of updates separated by carriage returns; the last update
is the bar's current state. This module reads only the end of each log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 1 << 16   # the end of a log holds its last bar update; logs of long jobs grow large


@dataclass(frozen=True)
class JobProgress:
    log: Path           # relative to the logs directory: {rule}/{wildcards}.log
    age_s: float        # seconds since the log was last written
    line: str           # its last progress update or line ('' for an empty log)

    def render(self) -> str:
        age = f"{self.age_s:.0f} s ago" if self.age_s < 120 else f"{self.age_s / 60:.0f} min ago"
        return f"{self.log.with_suffix('')}  [{age}]  {self.line}"


def last_line(path: Path, tail: int = TAIL_BYTES) -> str:
    """The last non-empty update of a log: its text after the last newline or carriage return."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(size - tail, 0))
        text = handle.read().decode("utf-8", errors="replace")
    parts = [p.strip() for p in text.replace("\r", "\n").split("\n")]
    return next((p for p in reversed(parts) if p), "")


def recent_jobs(logs: Path, since_s: float, now: float | None = None) -> list[JobProgress]:
    """Every log under logs written in the last since_s seconds, newest first, with its last progress line."""
    now = time.time() if now is None else now
    found = []
    for path in Path(logs).rglob("*.log"):
        age = now - path.stat().st_mtime
        if age <= since_s:
            found.append(JobProgress(path.relative_to(logs), max(age, 0.0), last_line(path)))
    return sorted(found, key=lambda job: (job.age_s, str(job.log)))

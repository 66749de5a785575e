"""Test hook of tests/test_slurm.py: a SLURM job cancels itself with scancel the moment a progress bar reaches a count.

On PYTHONPATH, every Python process of the run imports this at start-up (SLURM's --export=ALL carries the
environment into the jobs). With KVPIPE_SCANCEL_AT="<bar description prefix>:<count>" and
KVPIPE_SCANCEL_MARK=<file>, the first job inside SLURM (SLURM_JOB_ID set) whose bar reaches the count writes its
job id to the mark file, runs `scancel <its job id>` and waits to be killed: SLURM ends the job mid-stage, as an
operator or a preemption would. The mark makes Snakemake's resubmission of the job run to the end.
"""

import os
import subprocess
import time

_SPEC = os.environ.get("KVPIPE_SCANCEL_AT")
_MARK = os.environ.get("KVPIPE_SCANCEL_MARK")
_JOB = os.environ.get("SLURM_JOB_ID")

if _SPEC and _MARK and _JOB:
    from tqdm import std

    _prefix, _count = _SPEC.rsplit(":", 1)
    _update, _iter = std.tqdm.update, std.tqdm.__iter__

    def _cancel() -> None:
        try:
            fd = os.open(_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:  # an earlier job was cancelled: this one is the resubmission
            return
        with os.fdopen(fd, "w") as mark:
            mark.write(_JOB)
        subprocess.run(["scancel", _JOB], check=True)
        time.sleep(300)  # SLURM kills the job's processes long before this ends

    def _matches(bar: std.tqdm) -> bool:
        return str(bar.desc).startswith(_prefix)

    def update(self: std.tqdm, n: float = 1) -> bool | None:
        shown = _update(self, n)
        if _matches(self) and self.n >= int(_count):
            _cancel()
        return shown

    def iterate(self: std.tqdm):
        for done, item in enumerate(_iter(self)):
            if done == int(_count) and _matches(self):  # `done` items were processed: the next one never is
                _cancel()
            yield item

    std.tqdm.update, std.tqdm.__iter__ = update, iterate

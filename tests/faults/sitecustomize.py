"""Test hook of tests/test_faults.py: SIGKILL a whole Snakemake run the moment a progress bar reaches a count.

On PYTHONPATH, every Python process of the run imports this at start-up. With
KVPIPE_KILL_AT="<bar description prefix>:<count>", the job drawing that bar kills its session's
leader's process group (Snakemake, started in a session of its own) and its own group once
<count> items are done: the run dies mid-stage with nothing cleaned up, as on an OOM kill or a
node failure.
"""

import os
import signal

_SPEC = os.environ.get("KVPIPE_KILL_AT")

if _SPEC:
    from tqdm import std

    _prefix, _count = _SPEC.rsplit(":", 1)
    _update, _iter = std.tqdm.update, std.tqdm.__iter__

    def _kill() -> None:
        os.killpg(os.getsid(0), signal.SIGKILL)
        os.killpg(0, signal.SIGKILL)

    def _matches(bar: std.tqdm) -> bool:
        return str(bar.desc).startswith(_prefix)

    def update(self: std.tqdm, n: float = 1) -> bool | None:
        shown = _update(self, n)
        if _matches(self) and self.n >= int(_count):
            _kill()
        return shown

    def iterate(self: std.tqdm):
        for done, item in enumerate(_iter(self)):
            if done == int(_count) and _matches(self):   # `done` items were processed: the next one never is
                _kill()
            yield item

    std.tqdm.update, std.tqdm.__iter__ = update, iterate

"""Glue for the Snakemake scripts: the job's threads and GPUs, its log, and errors as one line."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from kvpipe.errors import KvpipeError, error_line

GPU_LOCKS = Path(".snakemake") / "kvpipe-gpus"  # under the run's working directory
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU of the machine (Linux driver)


def use_threads(threads: int) -> int:
    """Make torch compute with the job's threads (Snakemake's allocation); return the count in use."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def claim_gpus(count: int, stack: ExitStack, lock_dir: Path = GPU_LOCKS) -> list[str]:
    """Give this job ``count`` GPUs that no other job of the run holds; return their ids ([] if none chosen).

    Snakemake only counts GPUs (``--resources gpu=G`` runs at most G one-GPU jobs at a time); on a
    machine with several GPUs, every job would otherwise land on the first. Each GPU is a slot
    held by an exclusive lock on ``lock_dir/<host>/gpu{slot}.lock`` for as long as ``stack`` is
    open (the lock dies with the process; one directory per host, should the working directory be
    shared between machines), and the job sees only its own GPUs through
    CUDA_VISIBLE_DEVICES, set before torch initialises CUDA. Where CUDA_VISIBLE_DEVICES already
    names no more GPUs than the job asked for (SLURM's allocation), nothing is chosen.
    """
    if count < 1:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    if ids is not None and len(ids) <= count:
        return []
    if ids is None:
        ids = [str(i) for i in range(len(list(NVIDIA_GPUS.iterdir())))] if NVIDIA_GPUS.is_dir() else None
    lock_dir = lock_dir / socket.gethostname()
    lock_dir.mkdir(parents=True, exist_ok=True)
    chosen: list[str] = []
    slot = 0
    while len(chosen) < count:
        if ids is not None and slot >= len(ids):
            raise KvpipeError(f"no free GPU: the other jobs of this run hold all {len(ids)} GPUs of this machine "
                              "(--resources gpu=G must not exceed them)")
        lock: IO[str] = stack.enter_context(open(lock_dir / f"gpu{slot}.lock", "w"))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
        else:
            chosen.append(ids[slot] if ids is not None else str(slot))
        slot += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return chosen


@contextmanager
def rule_script(smk: Any) -> Iterator[None]:
    """Run a rule's script: output to the rule's log, torch threads and GPUs from the job's allocation.

    On a KvpipeError (or an OSError naming a file) print one line (log and terminal) and exit 1.
    """
    terminal = sys.stderr
    log = open(smk.log[0], "w") if smk.log else None
    if log is not None:
        sys.stdout = sys.stderr = log
        logging.basicConfig(stream=log, level=logging.INFO, force=True)
    try:
        with ExitStack() as gpu_locks:
            print(f"torch threads: {use_threads(smk.threads)}", flush=True)
            gpus = claim_gpus(int(smk.resources.get("gpu", 0) or 0), gpu_locks)
            if gpus:
                print(f"GPUs: CUDA_VISIBLE_DEVICES={','.join(gpus)}", flush=True)
            yield
    except (KvpipeError, OSError) as err:
        if error_line(err) is None:
            raise
        line = f"kvpipe: error in rule {smk.rule}: {error_line(err)}"
        print(line, file=sys.stderr)
        if log is not None:
            print(line, file=terminal)
        sys.exit(1)
    finally:
        if log is not None:
            sys.stdout, sys.stderr = sys.__stdout__, terminal
            log.close()

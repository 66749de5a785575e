"""Glue for the Snakemake scripts: log to the rule's log file and report errors as one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvpipe.errors import KvpipeError


@contextmanager
def rule_script(smk: Any) -> Iterator[None]:
    """Send output to the rule's log; on a KvpipeError print one line (log and terminal), exit 1."""
    terminal = sys.stderr
    log = open(smk.log[0], "w") if smk.log else None
    if log is not None:
        sys.stdout = sys.stderr = log
        logging.basicConfig(stream=log, level=logging.INFO, force=True)
    try:
        yield
    except KvpipeError as err:
        line = f"kvpipe: error in rule {smk.rule}: {err}"
        print(line, file=sys.stderr)
        if log is not None:
            print(line, file=terminal)
        sys.exit(1)
    finally:
        if log is not None:
            sys.stdout, sys.stderr = sys.__stdout__, terminal
            log.close()

"""One error type for bad input, reported as a single line by the CLI and workflow scripts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class KvpipeError(Exception):
    """Bad input or a failed check; the message names the file, field or model at fault."""


def error_line(err: Exception) -> str | None:
    """The one-line message for a KvpipeError or a file-system error naming its file; None for anything else."""
    if isinstance(err, KvpipeError):
        return str(err)
    if isinstance(err, OSError) and err.filename is not None:  # e.g. an output directory that is not writable
        return f"{err.filename}: {err.strerror or err}"
    return None


@contextmanager
def one_line_errors(prog: str = "kvpipe") -> Iterator[None]:
    """Turn a KvpipeError (or an OSError naming a file) into one line on stderr and exit status 2, without a traceback."""
    try:
        yield
    except (KvpipeError, OSError) as err:
        line = error_line(err)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        sys.exit(2)

"""One error type for bad input, reported as a single line by the CLI and workflow scripts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class KvpipeError(Exception):
    """Bad input or a failed check; the message names the file, field or model at fault."""


@contextmanager
def one_line_errors(prog: str = "kvpipe") -> Iterator[None]:
    """Turn a KvpipeError into one line on stderr and exit status 2, without a traceback."""
    try:
        yield
    except KvpipeError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)

"""Token alignment across tokenizers: two tokenisations of one text, paired by the characters their tokens cover.

A token's span is [start, end) on a character axis both models share: a sample's context
characters are numbered from 0 and its question characters follow them (kvpipe.data.prompt);
a span with start < 0 (template and special tokens) covers no character. `spans` puts the
tokens of many samples on one axis without letting two samples share a character.

`align(source, target)` lists, for every target token, the source tokens sharing at least one
of its characters (in position order) and how many characters each shares. A target token that
no source token overlaps has no counterpart (`matched` is False). The alignment then

  pools source rows per matched target token (`pool`): `mean` of the covering source rows, or
    `max_overlap`, the row of the covering token that shares the most characters (ties: the earlier);
  maps a source selection to exactly k target tokens (`transfer`): a target token is kept when the
    kept source tokens cover at least `min_cover` of its characters; if that gives more or fewer than
    k, target tokens are dropped or added by the source scores mapped to target tokens (the max over
    the source tokens covering each; none: -inf), ties broken by position (earlier first).

When both sides are the same tokens, `Alignment.identity(n)` pairs token i with token i and every
operation returns its input untouched, so a pair sharing a tokenizer gives exactly the numbers of
an unaligned analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpipe.errors import KvpipeError

POOLS = ("mean", "max_overlap")
SAMPLE_STRIDE = 1 << 32   # characters per sample on the shared axis of `spans` (offsets are int32)


def spans(char_start: np.ndarray, char_end: np.ndarray, sample_idx: np.ndarray | None = None) -> np.ndarray:
    """int64 [n, 2] spans; with sample_idx, each sample's characters are moved to their own stretch of the axis.
    A token covering no character (start < 0, or end <= start) gets (-1, -1)."""
    start, end = np.asarray(char_start, np.int64), np.asarray(char_end, np.int64)
    covers = (start >= 0) & (end > start)
    shift = 0 if sample_idx is None else np.asarray(sample_idx, np.int64) * SAMPLE_STRIDE
    return np.stack([np.where(covers, start + shift, -1), np.where(covers, end + shift, -1)], axis=1)


def _covering(spans_: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the tokens that cover characters, in (start, end) order, with their starts and ends."""
    idx = np.flatnonzero(spans_[:, 0] >= 0)
    order = idx[np.lexsort((spans_[idx, 1], spans_[idx, 0]))]
    return order, spans_[order, 0], spans_[order, 1]


@dataclass(frozen=True)
class Alignment:
    """Target token j is covered by source tokens source[indptr[j]:indptr[j + 1]], sharing `shared` characters."""

    source_spans: np.ndarray   # int64 [n_source, 2]
    target_spans: np.ndarray   # int64 [n_target, 2]
    indptr: np.ndarray         # int64 [n_target + 1]
    source: np.ndarray         # int64 [pairs], in position order per target token
    shared: np.ndarray         # int64 [pairs]: characters the target token and that source token share
    is_identity: bool = False

    @classmethod
    def identity(cls, n: int) -> Alignment:
        """Token i of one side is token i of the other (same tokenizer, same text)."""
        i, no_spans = np.arange(n), np.full((n, 2), -1, np.int64)
        return cls(no_spans, no_spans, np.arange(n + 1), i, np.ones(n, np.int64), True)

    @property
    def n_source(self) -> int:
        return len(self.source_spans)

    @property
    def n_target(self) -> int:
        return len(self.target_spans)

    @property
    def counts(self) -> np.ndarray:
        """Source tokens covering each target token."""
        return np.diff(self.indptr)

    @property
    def matched(self) -> np.ndarray:
        """bool [n_target]: target tokens with a counterpart."""
        return self.counts > 0

    @property
    def used(self) -> np.ndarray:
        """bool [n_source]: source tokens that cover a character of some target token."""
        used = np.zeros(self.n_source, bool)
        used[self.source] = True
        return used

    def targets(self, rows: np.ndarray) -> np.ndarray:
        """The rows of the matched target tokens (all of them, untouched, for the identity)."""
        return rows if self.is_identity else rows[self.matched]

    def pool(self, rows: np.ndarray, how: str | None) -> np.ndarray:
        """One row per matched target token from the source rows [n_source, d] (how: a POOLS entry)."""
        if self.is_identity:
            return rows
        matched = self.matched
        if not matched.any():
            return np.empty((0, rows.shape[1]), rows.dtype)
        if how == "mean":
            sums = np.add.reduceat(rows[self.source], self.indptr[:-1][matched], axis=0)
            return sums / self.counts[matched][:, None]
        if how == "max_overlap":
            target = np.repeat(np.arange(self.n_target), self.counts)
            order = np.lexsort((self.source, -self.shared, target))   # per target: most shared, then earliest
            return rows[self.source[order][self.indptr[:-1][matched]]]
        raise KvpipeError(f"alignment.pool: unknown pooling {how!r} (one of: {', '.join(POOLS)})")

    def max_scores(self, scores: np.ndarray) -> np.ndarray:
        """float64 [n_target]: per target token the max score of the source tokens covering it; -inf if none."""
        if self.is_identity:
            return scores
        out = np.full(self.n_target, -np.inf)
        matched = self.matched
        if matched.any():
            out[matched] = np.maximum.reduceat(np.asarray(scores, np.float64)[self.source], self.indptr[:-1][matched])
        return out

    def cover(self, kept: np.ndarray) -> np.ndarray:
        """float64 [n_target]: the share of each target token's characters that the kept source tokens cover."""
        _, start, end = _covering(self.source_spans[np.asarray(kept, np.int64)])
        ms, me = _merge(start, end)
        cum = np.concatenate([[0], np.cumsum(me - ms)])

        def below(x: np.ndarray) -> np.ndarray:   # kept characters before x
            i = np.searchsorted(ms, x, side="left")   # the i intervals starting before x; only the last may pass x
            beyond = np.maximum(me[np.maximum(i - 1, 0)] - x, 0) if len(ms) else 0
            return cum[i] - np.where(i > 0, beyond, 0)

        a, b = self.target_spans[:, 0], self.target_spans[:, 1]
        width = np.maximum(b - a, 0)
        return np.where(width > 0, (below(b) - below(a)) / np.maximum(width, 1), 0.0)

    def transfer(self, selection: np.ndarray, scores: np.ndarray, k: int, min_cover: float) -> np.ndarray:
        """Sorted indices of exactly k target tokens standing for a source selection (module docstring)."""
        if self.is_identity:
            return selection
        covered = self.cover(selection) >= min_cover
        mapped = self.max_scores(scores)
        order = np.lexsort((np.arange(self.n_target), -mapped, ~covered))   # covered first, then by score, then position
        return np.sort(order[:k])


def _merge(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted intervals of the union of [start, end) intervals sorted by start."""
    if not len(start):
        return start, end
    reach = np.maximum.accumulate(end)
    first = np.concatenate([[True], start[1:] > reach[:-1]])
    last = np.concatenate([first[1:], [True]])
    return start[first], reach[last]


def align(source: np.ndarray, target: np.ndarray) -> Alignment:
    """For every target span, the source spans sharing characters with it (spans as `spans` builds them)."""
    order, start, end = _covering(source)
    if (np.diff(end) < 0).any():
        raise KvpipeError("alignment: a token's characters lie inside another token's; cannot align tokens by characters")
    a, b = target[:, 0], target[:, 1]
    lo = np.searchsorted(end, a, side="right")    # first source token ending after a
    hi = np.searchsorted(start, b, side="left")   # source tokens starting before b
    counts = np.where(b > a, np.maximum(hi - lo, 0), 0)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    at = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts) + np.repeat(lo, counts)
    shared = np.minimum(np.repeat(b, counts), end[at]) - np.maximum(np.repeat(a, counts), start[at])
    return Alignment(np.asarray(source, np.int64), np.asarray(target, np.int64), indptr, order[at], shared)

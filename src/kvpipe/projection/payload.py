"""Bytes that cross the network for each way of giving the main model a context.

Everything is counted from the shapes actually sent: the context text in UTF-8, KV tensors
in float16 (2 bytes per element), truncated-SVD factors in float16 (or the raw matrix when
that is smaller), and a selection of context positions in the smaller of two encodings:
a bitmap over the context, or the sorted positions delta-coded as LEB128 varints.
"""

from __future__ import annotations

import numpy as np

FLOAT16 = 2


def text_bytes(text: str) -> int:
    """UTF-8 size of a text."""
    return len(text.encode("utf-8"))


def varint_bytes(values: np.ndarray) -> int:
    """Bytes of non-negative integers written as LEB128 varints (7 bits per byte)."""
    values = np.asarray(values, dtype=np.int64)
    if (values < 0).any():
        raise ValueError("varints encode non-negative integers")
    bits = np.maximum(1, np.floor(np.log2(np.maximum(values, 1))).astype(np.int64) + 1)
    return int(np.sum((bits + 6) // 7))


def index_bytes(selection: np.ndarray, n_context: int) -> int:
    """Bytes of a selection of context positions: bitmap or delta-coded varints, whichever is smaller."""
    positions = np.sort(np.asarray(selection, dtype=np.int64))
    deltas = np.diff(positions, prepend=0)
    return min((n_context + 7) // 8, varint_bytes(deltas))


def matrix_bytes(rows: int, width: int, rank: int | None = None) -> int:
    """A [rows, width] float16 matrix, or its rank-k SVD factors (U·S folded: [rows, k] + [k, width]) if smaller."""
    raw = rows * width * FLOAT16
    if rank is None:
        return raw
    return min(raw, rank * (rows + width) * FLOAT16)


def kv_bytes(tokens: int, widths: list[int], kinds: int = 2, rank: int | None = None) -> int:
    """KV of `tokens` tokens at layers of the given widths (num_kv_heads * head_dim), `kinds` tensors per layer."""
    return kinds * sum(matrix_bytes(tokens, w, rank) for w in widths)

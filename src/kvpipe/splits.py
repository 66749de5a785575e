"""Calibration / test split, cross-validation folds and sample subsets by *passage*, shared by every stage.

Questions on one passage share bit-identical context KV rows, so a split by question or by
token would put the same rows on both sides. Whole passages go to calibration or test
(scikit-learn's GroupShuffleSplit), and each calibration passage to one CV fold
(GroupKFold over the calibration passages, relabelled by a seeded shuffle so that passages
of equal size are dealt to the folds at random). A stage that uses fewer samples than were
sampled takes whole passages too (whole_passages).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.model_selection import GroupKFold, GroupShuffleSplit

from kvpipe.errors import KvpipeError


def split_by_passage(passages: ArrayLike, calibration_fraction: float, folds: int, seed: int,
                     section: str = "structure") -> tuple[np.ndarray, np.ndarray]:
    """Per sample: calibration fold (0..folds-1) or -1 for test; and the sorted test sample ids.

    passages[i] is the passage id of sample i; round(calibration_fraction x passages) passages
    are calibration, the rest test. Seeded and deterministic.
    """
    _, codes = np.unique(np.asarray(passages), return_inverse=True)
    codes = codes.reshape(-1)
    n_passages = int(codes.max()) + 1 if len(codes) else 0
    n_cal = int(round(n_passages * calibration_fraction))
    if n_cal < folds or n_passages - n_cal < 2:
        raise KvpipeError(f"{section}.calibration_fraction={calibration_fraction}: {n_passages} passages give {n_cal} "
                          f"calibration and {n_passages - n_cal} test passages; need at least {section}.cv_folds={folds} "
                          "calibration and 2 test passages")
    rows = np.zeros((len(codes), 1))
    outer = GroupShuffleSplit(n_splits=1, train_size=n_cal, test_size=n_passages - n_cal, random_state=seed)
    cal, _ = next(outer.split(rows, groups=codes))
    relabel = np.random.default_rng(seed).permutation(n_passages)
    fold = np.full(len(codes), -1)
    for f, (_, held) in enumerate(GroupKFold(n_splits=folds).split(rows[cal], groups=relabel[codes[cal]])):
        fold[cal[held]] = f
    return fold, np.flatnonzero(fold == -1)


def whole_passages(passages: ArrayLike, max_samples: int | None) -> np.ndarray:
    """Positions of the samples kept when at most max_samples may be used (None: all), taking whole passages.

    passages[i] is the passage id of the i-th sample in sample order. Passages are taken in order of
    first appearance until adding the next would exceed max_samples; the first is always taken.
    """
    passages = np.asarray(passages)
    if max_samples is None:
        return np.arange(len(passages))
    ids, first, sizes = np.unique(passages, return_index=True, return_counts=True)
    order = np.argsort(first)
    taken = max(1, int(np.searchsorted(np.cumsum(sizes[order]), max_samples, side="right")))
    return np.flatnonzero(np.isin(passages, ids[order[:taken]]))

import numpy as np
import pytest

from kvpipe.errors import KvpipeError
from kvpipe.splits import split_by_passage


def _questions_per_passage(n_passages=30, seed=0):
    """Passage id per sample: 1 to 5 questions per passage, in shuffled order (as sampling draws them)."""
    r = np.random.default_rng(seed)
    passages = np.repeat([f"passage-{i}" for i in range(n_passages)], r.integers(1, 6, n_passages))
    return r.permutation(passages)


def _old_per_question_split(n, calibration_fraction, folds, seed):
    """The split this helper replaced: by sample, so questions on one passage land on both sides."""
    n_cal = int(round(n * calibration_fraction))
    order = np.random.default_rng(seed).permutation(n)
    fold = np.full(n, -1)
    fold[order[:n_cal]] = np.arange(n_cal) % folds
    return fold, np.sort(order[n_cal:])


def _passages_in_one_part(passages, fold):
    """Each passage's samples are all test (-1) or all in one calibration fold."""
    return all(len(set(fold[passages == p])) == 1 for p in np.unique(passages))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_passage_is_in_calibration_and_test_or_in_two_folds(seed):
    passages = _questions_per_passage(seed=seed)
    fold, test = split_by_passage(passages, 0.5, 3, seed)
    assert _passages_in_one_part(passages, fold)
    assert set(test) == set(np.flatnonzero(fold == -1)) and (np.diff(test) > 0).all()
    assert set(fold[fold >= 0]) == {0, 1, 2}
    assert not _passages_in_one_part(passages, _old_per_question_split(len(passages), 0.5, 3, seed)[0])


def test_split_is_seeded_and_deterministic():
    passages = _questions_per_passage()
    fold, test = split_by_passage(passages, 0.5, 3, seed=4)
    again, again_test = split_by_passage(passages, 0.5, 3, seed=4)
    assert (again == fold).all() and (again_test == test).all()
    assert not (split_by_passage(passages, 0.5, 3, seed=5)[0] == fold).all()


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_calibration_fraction_counts_passages(fraction):
    passages = _questions_per_passage(n_passages=40)
    fold, _ = split_by_passage(passages, fraction, 3, seed=0)
    assert len(np.unique(passages[fold >= 0])) == pytest.approx(fraction * 40, abs=1)


def test_one_sample_per_passage_splits_samples_and_balances_folds():
    fold, test = split_by_passage(np.arange(20), 0.5, 3, seed=4)
    assert len(test) == 10 and set(np.flatnonzero(fold == -1)) == set(test)
    assert sorted(np.bincount(fold[fold >= 0])) == [3, 3, 4]
    again, _ = split_by_passage(np.arange(20), 0.5, 3, seed=4)
    assert (again == fold).all() and not (split_by_passage(np.arange(20), 0.5, 3, seed=5)[0] == fold).all()
    with pytest.raises(KvpipeError, match="structure.calibration_fraction"):
        split_by_passage(np.arange(4), 0.5, 3, seed=0)


@pytest.mark.parametrize("n_passages, fraction, folds", [(4, 0.5, 3), (5, 0.8, 2), (2, 0.5, 2)])
def test_too_few_passages_is_a_one_line_config_error(n_passages, fraction, folds):
    passages = np.repeat(np.arange(n_passages), 4)  # many questions, few passages
    with pytest.raises(KvpipeError, match=r"structure\.calibration_fraction=.* structure\.cv_folds=") as err:
        split_by_passage(passages, fraction, folds, seed=0)
    assert "\n" not in str(err.value)

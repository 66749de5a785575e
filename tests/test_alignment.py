"""Token alignment across tokenizers (kvpipe.alignment) and the character-space overlap built on it."""

import copy
import itertools

import numpy as np
import pytest

from kvpipe.alignment import POOLS, Alignment, align, spans
from kvpipe.config import schema, validate
from kvpipe.data.prompt import CONTEXT, QUESTION, TEMPLATE, build_prompt
from kvpipe.errors import KvpipeError
from kvpipe.models.load import load_tokenizer
from kvpipe.selection.overlap import character_overlap

# "abcdefgh": source tokens ab|cde|fgh; target tokens <template> a|bcd|ef|gh
SOURCE = spans([0, 2, 5], [2, 5, 8])
TARGET = spans([-1, 0, 1, 4, 6], [-1, 1, 4, 6, 8])


@pytest.fixture(scope="module")
def prompts(model_dirs, samples, smoke_config):
    """Each sample's prompt for the tiny Qwen tokenizer (scout and main share it) and the tiny Llama's own."""
    toks = {m: load_tokenizer(model_dirs[m]) for m in ("tiny-main", "tiny-llama")}
    return [{m: build_prompt(tok, smoke_config["prompt"], row.context, row.question) for m, tok in toks.items()}
            for row in samples.itertuples()]


def test_the_tiny_llama_tokenises_differently_from_the_tiny_qwen(prompts):
    for p in prompts:
        qwen, llama = p["tiny-main"], p["tiny-llama"]
        assert not qwen.same_tokens(llama) and qwen.same_tokens(qwen)
        assert not np.array_equal(qwen.context_spans, llama.context_spans)


def test_context_and_question_characters_share_one_axis(prompts, samples):
    for p, row in zip(prompts, samples.itertuples()):
        for tokens in p.values():
            seg, start, end = tokens.segment, tokens.char_start, tokens.char_end
            assert ((start == -1) == (seg == TEMPLATE)).all() and ((end == -1) == (seg == TEMPLATE)).all()
            n_ctx = len(row.context)
            assert (end[seg == CONTEXT] <= n_ctx).all() and (start[seg == QUESTION] >= n_ctx).all()
            text = row.context + row.question
            q = seg == QUESTION
            assert "".join(text[a:b] for a, b in zip(start[q], end[q])).strip() == row.question


def test_alignment_covers_every_character_once(prompts, samples):
    for p, row in zip(prompts, samples.itertuples()):
        n_chars = len(row.context) + len(row.question)
        sp = {m: spans(t.char_start, t.char_end) for m, t in p.items()}
        for s in sp.values():   # each tokenisation tiles the context and the question
            covered = np.zeros(n_chars, int)
            for a, b in s[s[:, 0] >= 0]:
                covered[a:b] += 1
            assert (covered == 1).all()
        al = align(sp["tiny-llama"], sp["tiny-main"])
        main = p["tiny-main"]
        assert (al.matched == (main.segment != TEMPLATE)).all()   # template tokens cover no character
        width = sp["tiny-main"][:, 1] - sp["tiny-main"][:, 0]
        per_target = np.add.reduceat(al.shared, al.indptr[:-1][al.matched])
        assert (per_target == width[al.matched]).all()   # each character of a main token in exactly one scout token
        assert al.used[sp["tiny-llama"][:, 0] >= 0].all() and not al.used[sp["tiny-llama"][:, 0] < 0].any()
        np.testing.assert_array_equal(al.cover(np.arange(al.n_source)), al.matched.astype(float))


def test_pooled_rows_shape_and_values():
    al = align(SOURCE, TARGET)
    assert al.matched.tolist() == [False, True, True, True, True]
    assert al.source.tolist() == [0, 0, 1, 1, 2, 2] and al.shared.tolist() == [1, 1, 2, 1, 1, 2]
    X = np.arange(6.0).reshape(3, 2)
    mean, best = al.pool(X, "mean"), al.pool(X, "max_overlap")
    assert mean.shape == best.shape == (4, 2)
    np.testing.assert_array_equal(mean, [X[0], (X[0] + X[1]) / 2, (X[1] + X[2]) / 2, X[2]])
    np.testing.assert_array_equal(best, [X[0], X[1], X[1], X[2]])   # "ef": one character each, the earlier wins
    np.testing.assert_array_equal(al.targets(np.arange(5)), [1, 2, 3, 4])
    assert set(POOLS) == {"mean", "max_overlap"}
    with pytest.raises(KvpipeError, match=r"^alignment.pool: unknown pooling 'median'"):
        al.pool(X, "median")


def test_samples_never_share_characters():
    sample = np.array([0, 0, 1, 1])
    al = align(spans([0, 2, 0, 2], [2, 4, 2, 4], sample), spans([0, 0], [4, 4], np.array([0, 1])))
    assert al.source.tolist() == [0, 1, 2, 3] and al.indptr.tolist() == [0, 2, 4]


def test_mapped_selection_has_exactly_the_budget():
    al = align(SOURCE, TARGET)
    scores = np.array([3.0, 1.0, 2.0])
    for k in range(1, al.n_target + 1):
        for selection in ([0], [1], [2], [0, 2], [0, 1, 2]):
            mapped = al.transfer(np.array(selection), scores, k, 0.5)
            assert len(mapped) == k and (np.diff(mapped) > 0).all() and 0 <= mapped[0] and mapped[-1] < al.n_target
    assert al.transfer(np.array([1]), scores, 2, 0.5).tolist() == [2, 3]   # "cde" covers 2/3 of "bcd", 1/2 of "ef"
    assert al.transfer(np.array([1]), scores, 1, 0.5).tolist() == [2]      # cut: "bcd" maps to max(3, 1), "ef" to 2
    assert al.transfer(np.array([1]), scores, 3, 0.5).tolist() == [1, 2, 3]   # filled: "a" maps to 3, "gh" to 2
    assert al.transfer(np.array([1]), scores, 4, 0.5).tolist() == [1, 2, 3, 4]
    assert al.transfer(np.array([1]), scores, 5, 0.5).tolist() == [0, 1, 2, 3, 4]   # the template token comes last


def test_min_cover_decides_which_partly_covered_tokens_are_kept():
    al = align(SOURCE, TARGET)
    np.testing.assert_allclose(al.cover(np.array([1])), [0, 0, 2 / 3, 1 / 2, 0])
    flat = np.zeros(3)   # equal scores: what is kept beyond the covered tokens goes by position
    assert al.transfer(np.array([1]), flat, 2, 0.5).tolist() == [2, 3]
    assert al.transfer(np.array([1]), flat, 2, 0.6).tolist() == [1, 2]   # "ef" (1/2) no longer counts as kept
    assert al.transfer(np.array([1]), flat, 2, 1.0).tolist() == [1, 2]   # nothing fully covered: scores, then position
    assert al.transfer(np.array([1, 2]), flat, 3, 1.0).tolist() == [1, 3, 4]   # "ef", "gh" fully covered; then "a"


def test_cover_counts_each_character_once_when_source_tokens_overlap():
    source = spans([0, 0, 1], [1, 1, 3])   # a character split over two byte-level tokens has two equal spans
    al = align(source, spans([0], [3]))
    assert al.source.tolist() == [0, 1, 2]
    np.testing.assert_allclose(al.cover(np.array([0, 1])), [1 / 3])
    np.testing.assert_allclose(al.cover(np.array([0, 1, 2])), [1.0])
    with pytest.raises(KvpipeError, match="^alignment: a token's characters lie inside another token's"):
        align(spans([0, 1], [4, 2]), spans([0], [4]))


def test_identity_returns_its_inputs_untouched():
    al = Alignment.identity(4)
    X, scores, sel = np.random.default_rng(0).random((4, 3)), np.arange(4.0), np.array([1, 3])
    assert al.pool(X, None) is X and al.targets(X) is X and al.max_scores(scores) is scores
    assert al.transfer(sel, scores, 2, 0.5) is sel and al.matched.all() and al.used.all()


def test_character_overlap_and_its_exact_null():
    scout = spans([0, 2, 3, 5, 6], [2, 3, 5, 6, 8])
    main = spans([0, 1, 4, 6], [1, 4, 6, 8])
    scout_kept, main_kept, forced = np.array([0, 4]), np.array([1, 3]), np.array([4])
    row = character_overlap(scout, scout_kept, forced, main, main_kept)
    main_chars = {1, 2, 3, 6, 7}
    assert row["char_overlap"] == pytest.approx(len(main_chars & {0, 1, 6, 7}) / 5)
    free = [0, 1, 2, 3]   # the null: the forced token plus one of the others, uniformly
    expected = np.mean([len(main_chars & {c for t in (pick, 4) for c in range(*scout[t])}) / 5 for pick in free])
    assert row["char_overlap_random"] == pytest.approx(expected)
    brute = np.mean([len(main_chars & {c for t in sel for c in range(*scout[t])}) / 5
                     for sel in itertools.combinations(range(5), 2)])
    none = character_overlap(scout, scout_kept, np.empty(0, np.int64), main, main_kept)
    assert none["char_overlap_random"] == pytest.approx(brute)


@pytest.mark.parametrize("alignment, message", [
    ({"pool": "median"}, r"^config: alignment.pool: 'median' is not one of \['mean', 'max_overlap'\]$"),
    ({"min_cover": 0}, r"^config: alignment.min_cover: 0 is less than or equal to the minimum of 0$"),
    ({"min_cover": 1.5}, r"^config: alignment.min_cover: 1.5 is greater than the maximum of 1$"),
    ({"pool": "mean", "cover": 0.5}, r"^config: alignment: Additional properties are not allowed \('cover' was unexpected\)$"),
])
def test_bad_alignment_config_is_a_one_line_error(smoke_config, alignment, message):
    config = copy.deepcopy(smoke_config)
    config["alignment"] = alignment
    with pytest.raises(KvpipeError, match=message):
        validate(config)


def test_alignment_defaults_match_the_pools(smoke_config):
    config = copy.deepcopy(smoke_config)
    del config["alignment"]
    assert validate(config)["alignment"] == {"pool": "mean", "min_cover": 0.5}
    assert schema()["properties"]["alignment"]["properties"]["pool"]["enum"] == list(POOLS)

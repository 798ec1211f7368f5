"""Alignment across tokenizers, vocabulary mapping, projection and fusion, against hand values."""

from __future__ import annotations

import math

import pytest

from hivemerge.merge.fusion.align import Group, VocabMap, _search, align_tokens, edit_distance
from hivemerge.merge.fusion.fuse import fuse_examples, fuse_token, project
from hivemerge.merge.fusion.packs import ExampleDistributions


def groups(src, piv, **kw):
    return [(g.src, g.piv, g.cost) for g in align_tokens(src, piv, **kw)]


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "abc") == 0
    assert edit_distance("ab", "ba") == 2


def test_bpe_against_characters():
    # A byte-level BPE cut of "arm 48213=" (what the bench's GPT-2 tokenizer produces) against a character pivot.
    src = ["arm", " 4", "8", "21", "3", "="]
    piv = list("arm 48213=")
    assert groups(src, piv) == [
        ((0, 1), (0, 3), 0),  # "arm" -> a r m
        ((1, 2), (3, 5), 0),  # " 4" -> ' ' 4
        ((2, 3), (5, 6), 0),
        ((3, 4), (6, 8), 0),  # "21" -> 2 1
        ((4, 5), (8, 9), 0),
        ((5, 6), (9, 10), 0),
    ]


def test_many_to_one_and_crossing_boundaries():
    # Several source tokens for one pivot token.
    assert groups(["4", "4", "\n"], ["44", "\n"]) == [((0, 2), (0, 1), 0), ((2, 3), (1, 2), 0)]
    # Boundaries that cross ("ab|c" against "a|bc"): one 2:2 group, the finest exact grouping.
    assert groups(["ab", "c", "d"], ["a", "bc", "d"]) == [((0, 2), (0, 2), 0), ((2, 3), (2, 3), 0)]


def test_texts_that_differ_align_by_edit_distance():
    # One tokenizer lower-cases, and the other has one more token at the end: the
    # cheapest alignment still pairs what corresponds.
    assert groups(["Hello", " wor", "ld", "!"], ["hello", " world"]) == [
        ((0, 1), (0, 1), 1),  # H/h
        ((1, 3), (1, 2), 0),
        ((3, 4), (2, 2), 1),  # "!" has no counterpart
    ]


def test_band_is_widened_when_texts_drift():
    # No state after the 30-character token is within 2 (or 8) characters of the pivot's
    # prefix, and no single group reaches the end: the band widens until one does.
    src, piv = ["x" * 30, *"abcdefgh"], list("abcdefgh")
    assert groups(src, piv, band=2) == [((0, 1), (0, 0), 30)] + [((i + 1, i + 2), (i, i + 1), 0) for i in range(8)]


@pytest.mark.parametrize("tokens", [
    list("47+38=85\n"),  # a character tokenizer: the demo's experts and pivot
    ["47", "+", "38", "=", "85", "\n"],
    ["a", "a", "aa", "a", " ", "a"],  # repeats, where many cheap groupings exist
    ["x"],
    [],
])
def test_identical_tokens_align_one_to_one_as_the_search_does(tokens):
    expected = [Group((i, i + 1), (i, i + 1), 0) for i in range(len(tokens))]
    assert align_tokens(tokens, list(tokens)) == expected
    assert _search(tokens, list(tokens), 8) == expected  # the shortcut gives what the search finds


def test_identical_tokens_with_an_empty_one_are_searched():
    tokens = ["a", "", "b"]  # an empty token could join either neighbour at no cost
    assert align_tokens(tokens, list(tokens)) == _search(tokens, list(tokens), 8)


def test_vocab_map_exact_then_nearest():
    pieces = {0: "a", 1: "b", 2: "ab", 3: "4", 4: "5", 5: "45", 6: "a", 7: "\n"}
    vocab = VocabMap(pieces)
    assert vocab("ab") == 2  # exact
    assert vocab("a") == 0  # exact, lowest id of two equal pieces
    assert vocab("abc") == 2  # nearest: distance 1, the only one
    assert vocab("5\n") == 4  # "5" and "\n" both at distance 1: "5" shares the prefix
    assert vocab("\n5") == 7  # the same tie the other way
    assert vocab("46") == 3  # "4" and "45" both at distance 1 sharing one character: the lowest id
    assert vocab("") is None


def test_projection_conditions_later_characters_on_the_prefix():
    # A BPE source predicting the two-digit token "44" (and rivals), against a character pivot.
    example = ExampleDistributions(
        targets=["44", "\n"],
        candidates=[[("44", 0.5), ("45", 0.3), ("4", 0.1), ("5\n", 0.1)], [("\n", 0.75), ("0", 0.25)]],
    )
    chars = {i: c for i, c in enumerate("0123456789\n")}
    out = project(example, ["4", "4", "\n"], VocabMap(chars))
    # First character: every candidate maps by its text ("44", "45", "4" -> 4; "5\n" -> 5).
    assert out[0] == pytest.approx({4: 0.9, 5: 0.1})
    # Second character, given "4": only "44" and "45" continue; they say 4 and 5, renormalised.
    assert out[1] == pytest.approx({4: 0.5 / 0.8, 5: 0.3 / 0.8})
    assert out[2] == pytest.approx({10: 0.75, 0: 0.25})


def test_projection_leaves_many_to_one_tokens_uncovered():
    example = ExampleDistributions(targets=["4", "4"], candidates=[[("4", 1.0)], [("4", 1.0)]])
    assert project(example, ["44"], VocabMap({0: "44", 1: "4"})) == [None]


def test_mince_picks_the_source_with_lowest_cross_entropy_per_token():
    a, b, c = 0, 1, 2
    s0 = [{a: 0.9, b: 0.1}, {a: 0.7, b: 0.3}, None]
    s1 = [{a: 0.2, b: 0.8}, {a: 0.1, b: 0.9}, {c: 1.0}]
    gold = [a, b, c]
    picked = [fuse_token([s0[k], s1[k]], gold[k], "mince") for k in range(3)]
    assert [p.chosen for p in picked] == [0, 1, 1]
    assert [p.dist for p in picked] == [s0[0], s1[1], s1[2]]
    # Equal cross-entropy: the first source.
    assert fuse_token([{a: 0.5, b: 0.5}, {a: 0.5, c: 0.5}], a, "mince").chosen == 0
    # A source that never proposed the reference token loses to one that did.
    assert fuse_token([{b: 1.0}, {a: 0.01, b: 0.99}], a, "mince").chosen == 1
    assert fuse_token([None, None], a, "mince").dist is None


def test_avgce_weights_by_softmax_of_minus_cross_entropy():
    a, b, c = 0, 1, 2
    fused = fuse_token([{a: 0.5, b: 0.5}, {a: 0.25, c: 0.75}], a, "avgce")
    # CE = ln 2 and ln 4: weights exp(-CE) normalised = 0.5 / 0.75 and 0.25 / 0.75.
    assert fused.weights == pytest.approx([2 / 3, 1 / 3])
    assert fused.dist == pytest.approx({a: 2 / 3 * 0.5 + 1 / 3 * 0.25, b: 2 / 3 * 0.5, c: 1 / 3 * 0.75})
    assert sum(fused.dist.values()) == pytest.approx(1.0)
    # A missing source gets weight 0 and the other all of it.
    alone = fuse_token([None, {a: 0.25, c: 0.75}], a, "avgce")
    assert alone.weights == [0.0, 1.0] and alone.dist == pytest.approx({a: 0.25, c: 0.75})


def test_fuse_examples_counts_coverage_and_picks():
    chars = {i: c for i, c in enumerate("0123456789\n")}
    good = ExampleDistributions(["12", "\n"], [[("12", 0.9), ("13", 0.1)], [("\n", 1.0)]])
    poor = ExampleDistributions(["1", "2", "\n"], [[("7", 1.0)], [("2", 0.5), ("3", 0.5)], [("\n", 1.0)]])
    fused, stats = fuse_examples([[good], [poor]], [["1", "2", "\n"]], [[1, 2, 10]], VocabMap(chars), "mince")
    # Token "1": good says 1 with 1.0, poor says 7: good. Token "2": good (given "1") says 2 with 0.9,
    # poor 0.5: good. Newline: both 1.0, the first.
    assert stats.picks == [3, 0] and stats.covered == 3 and stats.per_source_covered == [3, 3]
    assert fused[0][1] == pytest.approx({2: 0.9, 3: 0.1})
    _, avg = fuse_examples([[good], [poor]], [["1", "2", "\n"]], [[1, 2, 10]], VocabMap(chars), "avgce")
    assert avg.picks == [0, 0]
    with pytest.raises(ValueError):
        fuse_examples([[good]], [["1", "2", "\n"]], [[1, 2, 10]], VocabMap(chars), "max")


def test_cross_entropy_floor_is_finite():
    from hivemerge.merge.fusion.fuse import EPS, cross_entropy

    assert cross_entropy({1: 1.0}, 0) == pytest.approx(-math.log(EPS))

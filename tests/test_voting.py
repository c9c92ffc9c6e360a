"""Voting over candidate answers (negkd.voting): SC and ASC, answers grouped by equivalence."""

from __future__ import annotations

import pytest

from negkd.voting import ASC_WEIGHTS, BatchEquiv, asc_weights, group_answers, tally, vote, vote_accuracy, winner


def test_equivalent_answers_vote_together():
    preds = ["\\frac12", "3", "0.5", "3", "\\dfrac{1}{2}"]
    assert group_answers(preds) == [[0, 2, 4], [1, 3]]
    assert vote(preds) == "\\frac12"  # 3 votes against 2; the group answers with its first member
    # raw strings would have made "3" win 2 to 1
    assert [w for _, w, _ in tally(preds)] == [3.0, 2.0]


def test_ties_go_to_the_first_occurrence():
    assert vote(["7", "5", "5", "7"]) == "7"
    assert vote(["5", "7", "7", "5"]) == "5"


def test_unparseable_candidates_never_win():
    assert vote([None, None, "4"]) == "4"
    assert vote([None, "", "  "]) is None
    assert vote([]) is None
    assert vote_accuracy([None, None], "4") == 0.0


def test_weights_can_flip_the_majority():
    preds = ["1", "1", "2"]
    scores = [0.1, 0.1, 0.9]
    assert vote(preds) == "1"
    assert vote(preds, asc_weights(scores, "1")) == "1"
    assert vote(preds, asc_weights(scores, "s")) == "2"  # 0.2 vs 0.9
    assert vote(preds, asc_weights(scores, "1+2s")) == "2"  # 2.4 vs 2.8
    assert vote(preds, asc_weights(scores, "1+s")) == "1"  # 2.2 vs 1.9


def test_asc_weight_functions():
    assert set(ASC_WEIGHTS) == {"1", "1+2s", "1+s", "s"}
    assert [ASC_WEIGHTS[r](0.25) for r in ("1", "1+2s", "1+s", "s")] == [1.0, 1.5, 1.25, 0.25]
    with pytest.raises(ValueError):
        asc_weights([0.5], "2s")
    with pytest.raises(ValueError):
        vote(["1", "2"], [1.0])


def test_majority_accuracy_uses_the_same_tie_rule_as_vote():
    assert vote_accuracy(["4", "5"], "4") == 1.0 and vote_accuracy(["5", "4"], "4") == 0.0
    assert vote_accuracy(["6", "4", "5"], "4") == 0.0
    assert winner([2.0, 3.0, 3.0]) == 1 and winner([]) is None
    assert winner([0.1 + 0.2, 0.3]) == 0  # float sums within 1e-12 are a tie, not decided by rounding
    assert vote_accuracy(["4", "4.0", "5"], "4") == 1.0
    assert vote_accuracy(["5", "5", "4"], "4") == 0.0


def test_batch_equiv_groups_many_questions_like_one_by_one():
    lists = [["\\frac12", "0.5", "1"], ["x=5", "5", "6", None], ["\\frac{1}{4}", "1:4"], ["a", "b"]]
    eq = BatchEquiv(workers=1)
    assert eq.group_all(lists) == [group_answers(p) for p in lists]
    assert not eq.missing

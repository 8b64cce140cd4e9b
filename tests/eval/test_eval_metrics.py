"""Metrics against brute force and hand computation."""
import itertools
import math

import pytest
from sse_rl.eval import ProblemSamples, compute_metrics, majority_vote, pass_at_k
from sse_rl.eval.metrics import ks_for, standard_errors


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_forms():
    assert pass_at_k(64, 16, 1) == pytest.approx(16 / 64)  # pass@1 is the accuracy
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # 4 wrong < 5 draws


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)], ids=str)
def test_pass_at_k_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(*args)


def test_majority_vote_by_hand():
    # "7" twice (wrong), "12" once (right): the plurality is wrong
    assert majority_vote(["7", "12", "7"], [False, True, False]) is False
    # tie 1-1: the answer seen first wins
    assert majority_vote(["12", "7"], [True, False]) is True
    assert majority_vote(["7", "12"], [False, True]) is False
    # samples without an answer do not vote
    assert majority_vote([None, None, "12"], [False, False, True]) is True
    assert majority_vote([None, None], [False, False]) is False
    with pytest.raises(ValueError, match="2 answers but 1 grades"):
        majority_vote(["1", "2"], [True])


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(4) == [1, 2, 4]
    assert ks_for(6) == [1, 2, 4, 6]
    assert ks_for(64) == [1, 2, 4, 8, 16, 32, 64]


def _problem(pid, correct, answers, tokens=None, truncated=None):
    n = len(correct)
    return ProblemSamples(pid, "12", correct, answers, tokens or [10] * n, truncated or [False] * n)


def test_compute_metrics_by_hand():
    problems = [
        # 3/4 right; votes 12,12,7,12 -> right at every k
        _problem("a", [True, True, False, True], ["12", "12", "7", "12"], [10, 20, 30, 40],
                 [False, False, True, False]),
        # 1/4 right; votes 7,7,12,None -> maj@1 wrong, maj@2 wrong, maj@4: 7 twice -> wrong
        _problem("b", [False, False, True, False], ["7", "7", "12", None], [50, 60, 70, 80], [False, True, True, True]),
        # 0/4
        _problem("c", [False] * 4, [None] * 4),
    ]
    m = compute_metrics(problems)
    assert m.num_problems == 3 and m.samples == 4
    assert m.avg == pytest.approx((0.75 + 0.25 + 0.0) / 3)
    # pass@2 per problem: a: 1 - C(1,2)/C(4,2) = 1; b: 1 - C(3,2)/C(4,2) = 0.5; c: 0
    assert m.pass_at == pytest.approx({1: (0.75 + 0.25) / 3, 2: 1.5 / 3, 4: 2 / 3})
    assert m.maj_at == pytest.approx({1: 1 / 3, 2: 1 / 3, 4: 1 / 3})
    assert m.mean_tokens == pytest.approx((100 + 260 + 40) / 12)
    assert m.truncation_rate == pytest.approx(4 / 12)
    # SE over problems: sd([.75, .25, 0], ddof=1) / sqrt(3); over samples: sqrt(sum p(1-p)/(n-1)) / 3
    mean = 1 / 3
    sd = math.sqrt(((0.75 - mean) ** 2 + (0.25 - mean) ** 2 + mean**2) / 2)
    assert m.se_problems == pytest.approx(sd / math.sqrt(3))
    assert m.se_samples == pytest.approx(math.sqrt((0.75 * 0.25 + 0.25 * 0.75) / 3) / 3)
    flat = m.flat("aime24/")
    assert flat["aime24/avg@4"] == m.avg and flat["aime24/pass@2"] == m.pass_at[2] and "aime24/maj@4" in flat


def test_standard_errors_undefined_cases_are_nan():
    se_p, se_s = standard_errors([0.5], [1])
    assert math.isnan(se_p) and math.isnan(se_s)
    se_p, se_s = standard_errors([1.0, 0.0], [4, 4])
    assert se_p == pytest.approx(0.5) and se_s == 0.0


def test_compute_metrics_rejects_ragged_input():
    with pytest.raises(ValueError, match="same number of samples"):
        compute_metrics([_problem("a", [True], ["1"]), _problem("b", [True, False], ["1", "2"])])
    with pytest.raises(ValueError, match="problem 'x'"):
        ProblemSamples("x", "1", [True, False], ["1"], [1, 1], [False, False])

"""format, overlong (DAPO soft penalty) and the weighted combination."""
import doctest
import functools
import math

import pytest
from sse_rl.rewards import combine, format_reward, math_reward, overlong, shaping


@pytest.mark.parametrize("completion, expected", [
    (r"<think>work</think>The answer is \boxed{3}.", 1.0),
    (r"work</think>\boxed{3}", 1.0),  # template opened <think> in the prompt
    (r"<think>work</think>The answer is 3.", 0.0),  # no box after </think>
    (r"<think>\boxed{3}</think>done", 0.0),  # box only inside the reasoning
    (r"<think> </think>\boxed{3}", 0.0),  # empty reasoning
    (r"<think>a</think><think>b</think>\boxed{3}", 0.0),  # two think blocks
    (r"oops <think>a</think>\boxed{3}", 0.0),  # text before <think>
    (r"\boxed{3}", 0.0),  # no think block
    (r"<think>a</think>\boxed{3", 0.0),  # unclosed box
], ids=range(9))
def test_format(completion, expected):
    assert format_reward(["p"], [completion]) == [expected]
    assert format_reward(["p"], [[{"role": "assistant", "content": completion}]]) == [expected]


def test_overlong_matches_dapo_formula():
    max_length, cache = 100, 20
    lengths = [0, 79, 80, 81, 90, 99, 100, 101, 500]
    got = overlong(["p"] * 9, ["c"] * 9, [[7] * n for n in lengths], max_length=max_length, cache_length=cache)
    expected = [0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert all(math.isclose(g, e, abs_tol=1e-12) for g, e in zip(got, expected)), got
    bound = functools.partial(overlong, max_length=max_length, cache_length=cache)
    kwargs = {"completion_ids": [[1] * 90], "answer": ["1"], "trainer_state": None}
    assert bound(prompts=["p"], completions=["c"], **kwargs) == [-0.5]


def test_overlong_rejects_bad_parameters():
    with pytest.raises(ValueError, match="cache_length=0, max_length=10"):
        overlong(["p"], ["c"], [[1]], max_length=10, cache_length=0)
    with pytest.raises(ValueError, match="cache_length=20, max_length=10"):
        overlong(["p"], ["c"], [[1]], max_length=10, cache_length=20)
    with pytest.raises(ValueError, match="2 completions but 1 completion_ids"):
        overlong(["p"] * 2, ["c"] * 2, [[1]], max_length=10, cache_length=5)
    with pytest.raises(TypeError, match="completion_ids"):
        overlong(["p"], ["c"], max_length=10, cache_length=5)


def test_combine_weights_and_none():
    per = {"acc": [1.0, 0.0, None, None], "fmt": [1.0, 1.0, 1.0, None], "len": [-0.5, 0.0, -1.0, None]}
    total = combine(per, {"acc": 1.0, "fmt": 0.2, "len": 0.5})
    assert total[:3] == pytest.approx([0.95, 0.2, -0.3]) and total[3] is None
    with pytest.raises(ValueError, match=r"weights for \['acc'\]"):
        combine(per, {"acc": 1.0})
    with pytest.raises(ValueError, match="differ in length"):
        combine({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})


@pytest.mark.parametrize("module", [math_reward, shaping], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0

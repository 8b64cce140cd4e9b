"""math_accuracy in-process: extraction, integer fast path, math-verify path, gold reporting, TRL signature."""
import json
import random
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from sse_rl.rewards import GoldAnswerWarning, RewardTimeoutWarning, grade, math_accuracy, math_reward
from sse_rl.rewards.math_reward import _parse_gold, _verify_boxed, canonical_int, completion_text, last_boxed

PEER = "peer_graded/qwen25math_harness_math_cot_100_flat.jsonl"


@pytest.mark.parametrize("text, boxed", [
    (r"\boxed{1} and then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
    (r"x \boxed{" + "{" * 3000 + "7" + "}" * 3000 + "}", "{" * 3000 + "7" + "}" * 3000),
    (r"\boxed{}", ""),
    (r"done \boxed{12", None),
    (r"the answer is 12", None),
    (r"\fbox{12}", None),
], ids=["last", "nested", "deep", "empty", "unclosed", "none", "fbox"])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("answer, canonical", [
    ("204", "204"), ("033", "33"), ("-5", "-5"), ("\u22125", "-5"), ("+7", "7"), ("-0", "0"), ("10{,}000", "10000"),
    ("3,250", "3250"), (r"\text{204}", "204"), (r"60^\circ", "60"), (r"60^{\circ}", "60"), ("$ 42 $", "42"),
    (r"1\,000", "1000"), ("1,2", None), ("204.0", None), (r"\frac{1}{2}", None), ("\uff12\uff10\uff14", None),
    ("\u0662\u0660\u0664", None), ("{1}{2}", None), ("1" * 300, None),
])
def test_canonical_int(answer, canonical):
    assert canonical_int(answer) == canonical


@pytest.mark.parametrize("completion, gold, expected", [
    (r"<think>so \boxed{5}</think>The answer is \boxed{204}.", "204", 1.0),
    (r"<think>so \boxed{204}</think>The answer is \boxed{5}.", "204", 0.0),
    (r"<think>long reasoning, truncated \boxed{204}", "204", 1.0),
    ("Therefore the answer is 204.", "204", 0.0),
    (r"\boxed{17} \boxed{204}", "204", 1.0),
    (r"$\boxed{033}$", "33", 1.0),
    (r"\boxed{200+4}", "204", 1.0),
    (r"\boxed{2.04\times10^2}", "204", 1.0),
    (r"\boxed{204\%}", "204", 1.0),
    (r"\boxed{\pm 2}", "2", 0.0),
    (r"\boxed{1,2,3}", "2", 0.0),
    (r"\boxed{\dfrac{2}{4}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (r"\boxed{(2, 3)}", "(2,3)", 1.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{7\pi}", r"7\pi", 1.0),
    ("\\boxed{\uff12\uff10\uff14}", "204", 0.0),
], ids=lambda v: v if isinstance(v, float) else None)
def test_grade(completion, gold, expected):
    assert grade(completion, gold) == expected


def test_integer_fast_path_agrees_with_math_verify():
    """The fast path is only a shortcut: on integer pairs it must give exactly math-verify's verdict."""
    rng = random.Random(0)
    forms = ["{}", "0{}", r"\text{{{}}}", "{}^\\circ", "$ {} $"]
    for _ in range(150):
        gold = rng.randint(-999, 999)
        pred = gold if rng.random() < 0.5 else rng.randint(-999, 999)
        boxed = rng.choice(forms).format(pred)
        fast = grade(rf"\boxed{{{boxed}}}", str(gold))
        slow = _verify_boxed(_parse_gold(str(gold)), boxed)
        assert fast == slow == float(pred == gold), (gold, boxed, fast, slow)


def test_unparseable_gold_is_skipped_and_reported():
    with pytest.warns(GoldAnswerWarning, match="unparseable gold answer ''"):
        assert grade(r"\boxed{1}", "") is None
    with pytest.warns(GoldAnswerWarning, match="parses only as text"):
        assert grade(r"\boxed{4:30p..}", "4:30p..") == 1.0
    with pytest.raises(TypeError, match="gold answer must be a string or an int, got NoneType"):
        grade(r"\boxed{1}", None)


def test_math_accuracy_takes_trl_arguments():
    completions = [[{"role": "assistant", "content": r"\boxed{12}"}], r"<think>\boxed{12}</think>\boxed{13}", "12"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rewards = math_accuracy(prompts=["p"] * 3, completions=completions, answer=[12, "12", "12"],
                                completion_ids=[[1], [2], [3]], trainer_state=None, log_extra=print,
                                log_metric=print, solution=["x"] * 3)
    assert rewards == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="3 completions but 2 'answer' values"):
        math_accuracy(["p"] * 3, completions, answer=["1", "2"])
    with pytest.raises(TypeError, match="got int"):
        completion_text(5)


def test_agreement_with_peer_grader_in_process(shared_data):
    rows = [json.loads(line) for line in (shared_data / PEER).read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GoldAnswerWarning)
        verdicts = [grade(r["completion"], r["gold"]) == 1.0 for r in rows]
    disagree = [r["gold"] for r, v in zip(rows, verdicts) if v != r["peer_correct"]]
    assert len(rows) == 800 and len(disagree) <= 1, disagree


def test_math_verify_alarm_gives_zero_and_a_timeout_warning(monkeypatch):
    monkeypatch.setattr(math_reward, "MATH_VERIFY_TIMEOUT_S", 1)
    start = time.monotonic()
    with pytest.warns(RewardTimeoutWarning, match="verify alarm"):
        assert grade(r"\boxed{10^{10^{10}}}", "10") == 0.0
    # two 1 s alarms (parse, verify) plus grading; the default 5 s alarm would take longer than this bound
    assert time.monotonic() - start < 4.5


def test_works_off_the_main_thread():
    """math-verify's alarms only work in a main thread; off it they are switched off instead of raising."""
    with ThreadPoolExecutor(1) as ex:
        got = ex.submit(math_accuracy, ["p"] * 2, [r"\boxed{\frac{2}{4}}", r"\boxed{3}"], answer=[r"\frac12", "4"])
        assert got.result() == [1.0, 0.0]


def test_towers_of_braces_are_wrong_without_parsing():
    """latex2sympy mis-parses very deep towers (300 nested reciprocals of 2, which equal 2, parse as 1/2): boxes
    nested deeper than MAX_BOX_DEPTH score 0; ordinary nesting is still graded."""
    from sse_rl.rewards.math_reward import MAX_BOX_DEPTH

    tower = r"\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 300 + "}"
    assert grade(tower, r"\frac{1}{2}") == 0.0
    assert grade(tower, "2") == 0.0
    assert grade(r"\boxed{\frac{1}{\frac{1}{2}}}", "2") == 1.0
    shallow = r"\boxed{" + r"\frac{1}{" * (MAX_BOX_DEPTH - 2) + "2" + "}" * (MAX_BOX_DEPTH - 2) + "}"
    assert grade(shallow, "2" if MAX_BOX_DEPTH % 2 == 0 else r"\frac{1}{2}") == 1.0

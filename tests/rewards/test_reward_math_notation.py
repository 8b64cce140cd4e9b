"""math_accuracy reads numbers as TeX writes them (#25): one-token TeX arguments (`\\frac13`, `\\sqrt3`) score as their
value, and digits are joined only across a valid thousands grouping, never across a space or a `32, 349` pair."""
import json
import warnings

import pytest
from sse_rl.eval.grading import extract_answer
from sse_rl.rewards import GoldAnswerWarning, grade
from sse_rl.rewards.math_reward import canonical_int, expand_tex_shorthand

GOLD_FILES = ["math500.jsonl", "math_train.jsonl"]


@pytest.mark.parametrize("completion, gold, expected", [
    # TeX shorthand is its value
    (r"so the answer is \boxed{\frac13}", "1/3", 1.0),
    (r"so the answer is \boxed{\frac13}", r"\frac{1}{3}", 1.0),
    (r"\boxed{\tfrac12}", "1/2", 1.0),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\sqrt3}", r"\sqrt{3}", 1.0),
    (r"\boxed{2\sqrt3}", r"2\sqrt{3}", 1.0),
    (r"\boxed{\frac94}", "9/4", 1.0),
    (r"\boxed{\frac 9 4}", r"\frac{9}{4}", 1.0),
    (r"\boxed{-\frac34}", "-0.75", 1.0),
    (r"\boxed{\frac{\sqrt3}2}", r"\frac{\sqrt{3}}{2}", 1.0),
    (r"\boxed{\frac\pi2}", r"\frac{\pi}{2}", 1.0),
    (r"\boxed{\frac ab}", "a/b", 1.0),
    (r"\boxed{\sqrt[3]8}", "2", 1.0),
    (r"\boxed{\binom52}", "10", 1.0),
    (r"\boxed{\left(\frac12, 3\right)}", r"\left(\frac{1}{2}, 3\right)", 1.0),
    (r"\boxed{\frac{9}{4}}", r"\frac94", 1.0),
    (r"\boxed{2007 + \frac{\pi}{2}}", r"2007 + \frac\pi 2", 1.0),
    # ... and only its value: TeX's arguments are single tokens, `\frac123` is \frac{1}{2}3
    (r"\boxed{\frac13}", "13", 0.0),
    (r"\boxed{\frac13}", r"\frac{13}{1}", 0.0),
    (r"\boxed{\frac123}", "1/23", 0.0),
    (r"\boxed{\frac123}", "3/2", 1.0),
    # non-TeX spellings stay wrong, as before
    (r"\boxed{sqrt(3)}", r"\sqrt{3}", 0.0),
    # thousands groups are one number
    (r"\boxed{10{,}000}", "10000", 1.0),
    (r"\boxed{10,000}", "10000", 1.0),
    (r"\boxed{10,\!000}", "10000", 1.0),
    (r"\boxed{10\,000}", "10000", 1.0),
    (r"\boxed{1,000,000}", "1000000", 1.0),
    (r"\boxed{\text{10,000}}", "10000", 1.0),
    (r"\boxed{10000}", "10{,}000", 1.0),
    (r"\boxed{32,349}", "32349", 1.0),
    # a space or an invalid grouping separates numbers
    (r"\boxed{32, 349}", "32349", 0.0),
    (r"\boxed{10, 000}", "10000", 0.0),
    (r"\boxed{1,00}", "100", 0.0),
    (r"\boxed{1,0000}", "10000", 0.0),
    (r"\boxed{12,34,567}", "1234567", 0.0),
    (r"\boxed{3 4}", "34", 0.0),
    (r"\boxed{3\ 4}", "34", 0.0),
    (r"\boxed{1 000}", "1000", 0.0),
    (r"\boxed{81256}", "81, 256", 0.0),
    (r"\boxed{60120}", r"60^\circ, 120^\circ", 0.0),
    # lists follow math-verify's set semantics
    (r"\boxed{32, 349}", "32, 349", 1.0),
    (r"\boxed{349, 32}", "32, 349", 1.0),
    (r"\boxed{32,349}", "32, 349", 0.0),
    (r"\boxed{32, 349}", "32", 0.0),
    (r"\boxed{81, 256}", "81, 256", 1.0),
    # regressions: what scored before still does
    (r"\boxed{\tfrac{1}{2}}", "1/2", 1.0),
    (r"\boxed{033}", "33", 1.0),
    (r"$\boxed{ 42 }$", "42", 1.0),
    (r"\boxed{- 5}", "-5", 1.0),
    (r"\boxed{60^\circ}", "60", 1.0),
    (r"\boxed{\$ 1500}", "1500", 1.0),
    (r"\boxed{10{,}000 \text{ dollars}}", "10000", 1.0),
    (r"\boxed{[-\frac13, 1]}", r"[-\tfrac13, 1]", 1.0),
    (r"\boxed{\frac{3}{4}i}", r"-\frac34i", 0.0),
])
def test_grade_notation(completion, gold, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GoldAnswerWarning)
        assert grade(completion, gold) == expected


@pytest.mark.parametrize("answer, canonical", [
    ("10,000", "10000"), ("10{,}000", "10000"), (r"10,\!000", "10000"), (r"11,\! 111,\! 100", "11111100"),
    (r"10\,000", "10000"), (r"\ 42\;", "42"), (r"\$ 5", "5"),
    ("32, 349", None), ("1,00", None), ("3 4", None), (r"3\ 4", None), ("1 000", None), ("12,34,567", None),
    (r"60^\circ, 120^\circ", None),
])
def test_canonical_int_joins_only_thousands_groups(answer, canonical):
    assert canonical_int(answer) == canonical


@pytest.mark.parametrize("tex, braced", [
    (r"\frac13", r"\frac{1}{3}"),
    (r"\tfrac12+\dfrac 3 4", r"\tfrac{1}{2}+\dfrac {3} {4}"),
    (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}"),
    (r"\frac{\frac12}3", r"\frac{\frac{1}{2}}{3}"),
    (r"\frac\pi2", r"\frac{\pi}{2}"),
    (r"\sqrt[3]8", r"\sqrt[3]{8}"),
    (r"\frac123", r"\frac{1}{2}3"),
    (r"\binom52", r"\binom{5}{2}"),
    (r"\frac{1}{2}+\sqrt{3}", r"\frac{1}{2}+\sqrt{3}"),
    (r"\fraction12 \sqrtx", r"\fraction12 \sqrtx"),
    (r"\frac", r"\frac"),
    (r"\frac{1", r"\frac{1"),
])
def test_expand_tex_shorthand(tex, braced):
    assert expand_tex_shorthand(tex) == braced


def test_every_shorthand_gold_grades_itself(shared_data):
    """The golds of MATH written in TeX shorthand (92 of them) used to score 0 against a completion that copied them."""
    lines = [line for name in GOLD_FILES for line in (shared_data / name).read_text().splitlines()]
    golds = {json.loads(line)["answer"] for line in lines}
    shorthand = sorted(g for g in golds if expand_tex_shorthand(g) != g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GoldAnswerWarning)
        wrong = [g for g in shorthand if grade(rf"\boxed{{{g}}}", g) != 1.0]
    assert len(shorthand) > 50 and not wrong, wrong


@pytest.mark.parametrize("boxed, vote", [
    ("3 4", "3 4"), ("34", "34"), ("32, 349", "32,349"), ("32,349", "32349"), (r" \frac { 1 } { 2 } ", r"\frac{1}{2}"),
    ("1  2\n3", "1 2 3"), ("x + 1", "x+1"),
])
def test_maj_vote_does_not_join_digits(boxed, vote):
    """The maj@k vote (eval/grading.py) drops whitespace but never joins two numbers into one."""
    assert extract_answer(rf"\boxed{{{boxed}}}") == vote

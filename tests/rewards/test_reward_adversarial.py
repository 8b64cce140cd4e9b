"""Adversarial completions and golds through the real pool: each returns within timeout + 1 s, scores as expected
(0 unless the answer is right), crashes nothing, leaks no worker and executes nothing."""
import time

import pytest
from reward_procs import reward_children
from sse_rl.rewards import RewardPool, SandboxConfig

TIMEOUT_S = 2.0
MB = 1 << 20
PROSE = "We consider the sum of the first terms and simplify carefully. "


def _cases(marker: str) -> list[tuple[str, str, str, set]]:
    """(id, completion, gold, allowed values)."""
    zero, one = {0.0}, {1.0}
    touch = f"__import__('os').system('touch {marker}')"
    return [
        ("tower_10", r"\boxed{10^{10^{10}}}", "10", zero),
        ("tower_9", r"\boxed{9^{9^{9}}}", "1", zero),
        ("tower_plain_text", "so it is 9^9^9", "1", zero),
        ("tower_mv65", r"\boxed{\dfrac{5^{(5^{(5^{(5^5)})}-4)}-5}{16}}", r"\frac{1}{2}", zero),
        ("double_exp", r"\boxed{2^{2^{40}}}", "1", zero),
        ("factorial_1e9", r"\boxed{(10^9)!}", "1", zero),
        ("factorial_1e5", r"\boxed{100000!}", r"\frac{1}{2}", zero),
        ("1mb_prose", PROSE * (MB // len(PROSE)), "204", zero),
        ("1mb_prose_then_answer", PROSE * (MB // len(PROSE)) + r" \boxed{204}", "204", one),
        ("1mb_digits_boxed", r"\boxed{" + "7" * MB + "}", "204", zero),
        ("1mb_dollars", "$" * MB, "204", zero),
        ("1mb_in_think", "<think>" + "\\boxed{" * (MB // 8) + r"</think>\boxed{204}", "204", one),
        ("unclosed_boxes", r"\boxed{" * 140_000, "1", zero),
        ("nested_braces_5000", r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", r"\frac{1}{2}", zero),
        ("nested_frac_300", r"\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 300 + "}", r"\frac{1}{2}", zero),
        ("parens_2000", r"\boxed{" + "(" * 2000 + "1" + ")" * 2000 + "}", r"\frac{1}{2}", zero),
        ("many_boxes", r"\boxed{1} " * 20_000 + r"\boxed{204}", "204", one),
        ("hedged_boxes", r"\boxed{1}, \boxed{2}, \boxed{3}", "2", zero),
        ("set_hedge", r"\boxed{1,2,3}", "2", zero),
        ("fullwidth_digits", "\\boxed{\uff12\uff10\uff14}", "204", zero),
        ("arabic_indic_digits", "\\boxed{\u0662\u0660\u0664}", "204", zero),
        ("unicode_minus", "\\boxed{\u22125}", "-5", one),
        ("vulgar_half", "\\boxed{\u00bd}", r"\frac{1}{2}", zero),
        ("cjk_emoji_prose", "答案是 🎉 \\boxed{204} 🎉", "204", one),
        ("frac_missing_arg", r"\boxed{\frac{1}{}}", "1", zero),
        ("unbalanced_left_right", r"\boxed{\left( 1 \right}", "1", zero),
        ("empty_box", r"\boxed{}", "1", zero),
        ("bare_sqrt", r"\boxed{\sqrt}", "1", zero),
        ("unclosed_env", r"\boxed{\begin{pmatrix} 1 & 2", "1", zero),
        ("injection_boxed", rf"\boxed{{{touch}}}", "1", zero),
        ("injection_text", f"The answer is {touch}", "1", zero),
        ("injection_operatorname",
         r"\boxed{\operatorname{__import__}('os').system('touch " + marker + "')}", "1", zero),
        ("injection_eval_text", rf"\boxed{{\text{{eval(\"open('{marker}', 'w')\")}}}}", "1", zero),
        ("injection_in_gold", r"\boxed{1}", touch, {0.0, None}),
    ]


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("adversarial") / "PWNED"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(["math_accuracy"], SandboxConfig(workers=2, timeout_s=TIMEOUT_S, memory_mb=2048)) as p:
        p.score(["p"] * 2, [r"\boxed{1}"] * 2, answer=["1"] * 2)  # workers warm
        yield p


@pytest.mark.parametrize("case", range(len(_cases("M"))), ids=[c[0] for c in _cases("M")])
def test_adversarial_item(pool, marker, case):
    name, completion, gold, allowed = _cases(str(marker))[case]
    start = time.monotonic()
    result = pool.score(["p"], [completion], answer=[gold])
    elapsed = time.monotonic() - start
    assert elapsed <= TIMEOUT_S + 1.0, f"{name}: {elapsed:.2f} s"
    assert result.per_function["math_accuracy"][0] in allowed, (name, result)
    assert not marker.exists(), f"{name} executed code"


def test_no_worker_leaked_after_the_set(pool):
    """Killed workers are gone: our only children are the current workers (besides multiprocessing's helpers)."""
    assert reward_children() == set(pool.worker_pids())

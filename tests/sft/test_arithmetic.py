"""The arithmetic task: answers recomputed with Python ints, a disjoint held-out split, determinism, slipped
solutions for the SFT teacher, the tokenizer."""
from __future__ import annotations

import json
import random
import re

import pytest
from sse_rl.tasks import arithmetic
from sse_rl.tasks.arithmetic import SLIP_DELTAS, SLIP_RATE, Difficulty, make_problem, make_rows, slipped_rows
from transformers import AutoTokenizer

LINE = re.compile(r"(\d+) ([+x-]) (\d+) = (-?\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


def check_solution(row: dict[str, str], d: Difficulty) -> int:
    """Recompute every line of the worked solution; operands are numbers of the problem or earlier results."""
    lines = LINE.findall(row["solution"])
    assert len(lines) in d.steps, row
    known, result = {int(n) for n in re.findall(r"\d+", row["problem"])}, None
    for a, op, b, c in lines:
        a, b, c = int(a), int(b), int(c)
        assert {a, b} <= known, (row, a, b)
        assert OPS[op](a, b) == c >= 0, row
        known.add(c)
        result = c
    assert row["solution"].endswith(f"The answer is \\boxed{{{result}}}.") and row["answer"] == str(result), row
    return result


def test_answers_recompute_with_python_ints() -> None:
    d = Difficulty()
    for row in make_rows("test") + random.Random(0).sample(make_rows("train"), 2000):
        check_solution(row, d)


def test_difficulty_bounds_steps_and_numbers() -> None:
    d = Difficulty(steps=(3,), max_operand=20, max_factor=4)
    rng = random.Random(5)
    for _ in range(500):
        row = make_problem(rng, d)
        check_solution(row, d)
        assert max(int(n) for n in re.findall(r"\d+", row["problem"])) <= 20, row
        factors = [(int(a), int(b)) for a, op, b, _ in LINE.findall(row["solution"]) if op == "x"]
        assert all(min(f) <= 4 for f in factors), row  # one factor of each product is a group count <= max_factor


def test_held_out_split_is_fixed_disjoint_and_deterministic() -> None:
    test, train = make_rows("test"), make_rows("train")
    assert len(test) == 500 == len({r["problem"] for r in test})
    assert len(train) == 200_000
    assert not {r["problem"] for r in test} & {r["problem"] for r in train}
    arithmetic._chains.cache_clear()  # regenerate from the seed, not from the cache
    assert make_rows("test") == test
    with pytest.raises(ValueError, match="'train' or 'test'"):
        make_rows("validation")


def test_slipped_rows_keep_problems_and_true_answers_and_slip_one_result_carried_through() -> None:
    clean, slipped = make_rows("train"), slipped_rows("train")
    assert [(r["problem"], r["answer"]) for r in slipped] == [(r["problem"], r["answer"]) for r in clean]
    changed = [(c, s) for c, s in zip(clean, slipped) if c["solution"] != s["solution"]]
    assert abs(len(changed) / len(clean) - SLIP_RATE) < 0.01
    for c, s in random.Random(0).sample(changed, 2000):
        ours, theirs = LINE.findall(s["solution"]), LINE.findall(c["solution"])
        assert len(ours) == len(theirs)
        offs = [int(res) - OPS[op](int(a), int(b)) for a, op, b, res in ours]  # each written line checked on its own
        slips = [off for off in offs if off]
        assert len(slips) == 1 and slips[0] in SLIP_DELTAS, s
        assert all(int(res) >= 0 for *_, res in ours), s
        boxed = s["solution"].rsplit("{", 1)[1].split("}")[0]
        assert boxed == ours[-1][3] != s["answer"] == theirs[-1][3], (c, s)  # the slip reaches the boxed answer
    assert make_rows("test", slip_rate=SLIP_RATE) != make_rows("test")  # the rate applies to any split it is asked of


def test_cli_writes_the_split_for_sse_rl_eval(tmp_path) -> None:
    out = tmp_path / "test.jsonl"
    assert arithmetic.main(["--split", "test", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["problem"], r["answer"]) for r in rows] == [(r["problem"], r["answer"]) for r in make_rows("test")]
    assert len({r["id"] for r in rows}) == 500


def test_tokenizer_round_trips_splits_digits_and_has_the_chat_template(tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(arithmetic.build_tokenizer(tmp_path))
    assert len(tok) == 1024 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    row = make_rows("test")[7]
    chat = tok.apply_chat_template([{"role": "user", "content": row["problem"]},
                                    {"role": "assistant", "content": row["solution"]}], tokenize=False)
    assert chat == f"<|im_start|>user\n{row['problem']}<|im_end|>\n<|im_start|>assistant\n{row['solution']}<|im_end|>\n"
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == chat
    pieces = tok.convert_ids_to_tokens(tok("12 x 345 = 4140.", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == list("123454140")

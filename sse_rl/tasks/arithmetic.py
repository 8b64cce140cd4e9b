"""Arithmetic word problems with worked solutions: the task of the one-GPU learning demo (SFT, then GRPO).

A problem is a short story (shopping, baking, a farm, money, a library, ages) whose answer takes 2-3 operations
(+, -, x) on small numbers; its solution writes every intermediate computation and ends in the boxed answer:
"4 x 7 = 28. 23 + 28 = 51. The answer is \\boxed{51}." Answers are exact Python ints, so rewards are verifiable.

Why this task: difficulty is a dial (`Difficulty`: operations per problem, the largest addend and group size, the
largest group count), and multiplying a two-digit number inside a 2-3 step chain is hard enough that a ~100M
SSE-H after minutes of SFT gets only part of the held-out problems right, which leaves GRPO room to improve.

Pieces, each reached through a recipe the way a user's own task would be:
- `rows(split)`: data source `sse_rl.tasks.arithmetic:rows`, columns `problem`, `solution`, `answer`; "test" is a
  fixed set of 500 problems whose texts never occur in "train" (200k problems; enforced, not assumed);
- `slipped_rows(split)`: data source `sse_rl.tasks.arithmetic:slipped_rows`, the same problems and true answers with
  SLIP_RATE of the solutions carrying one slip (an imperfect teacher for SFT; `Chain` carries the slip through);
- `build_tokenizer(out_dir)`: a 1024-token byte-level BPE trained on the train split, one token per digit;
- `python -m sse_rl.tasks.arithmetic --split test --out FILE.jsonl`: a split as jsonl for `sse-rl eval --data-file`.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
TEST_SIZE, TRAIN_SIZE = 500, 200_000
TEST_SEED, TRAIN_SEED, SLIP_SEED = 1, 2, 3
SLIP_RATE = 0.4  # share of slipped solutions in `slipped_rows`
SLIP_DELTAS = (-10, -2, -1, 1, 2, 10)  # how far a slipped result is off: a carry or a digit
TOKENIZER_TEXTS = 20_000  # train problems the BPE is fitted on (more adds nothing: the wording repeats)
NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemal", "Lena", "Maya",
         "Noah", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yuki", "Zoe")


@dataclass(frozen=True)
class Difficulty:
    """The default is set for the one-GPU demo: with (2, 3) steps, operands to 99 and factors to 12, a 108M SSE-H
    after ~8.5M SFT tokens got 93.8 % of tokens right but only 1.4 % of answers (avg@4, H100 run of 2026-11-24),
    too far from the reward for 40 GRPO steps; smaller numbers leave the model a middling start."""

    steps: tuple[int, ...] = (2, 3)  # operations per problem (one line of the worked solution each), drawn uniformly
    max_operand: int = 30  # largest number added or subtracted, and largest group size
    max_factor: int = 6  # largest number of groups (the other factor of each multiplication)


@dataclass(frozen=True)
class Scenario:
    """Sentence templates of one story over a running quantity. Fields: {name}, {other}, {a} (a count or a group
    count), {b} (a group size)."""

    has: str  # opening with a plain quantity {a}
    groups: str  # opening with {a} groups of {b}
    add: tuple[str, ...]
    sub: tuple[str, ...]
    add_groups: str  # {a} more groups of {b}
    sub_groups: str  # {a} groups of {b} taken away
    question: str


SCENARIOS = (
    Scenario("{name} has {a} stickers.", "{name} buys {a} packs of stickers with {b} stickers in each pack.",
             ("{name} buys {a} more stickers.", "{other} gives {name} {a} stickers."),
             ("{name} gives {a} stickers to {other}.", "{name} loses {a} stickers."),
             "Then {name} buys {a} more packs with {b} stickers in each.",
             "{name} gives {a} friends {b} stickers each.", "How many stickers does {name} have now?"),
    Scenario("A baker has {a} cookies.", "A baker bakes {a} trays of cookies with {b} cookies on each tray.",
             ("The baker bakes {a} more cookies.", "{other} brings {a} cookies to the bakery."),
             ("The baker sells {a} cookies.", "{name} buys {a} cookies from the baker."),
             "The baker bakes {a} more trays with {b} cookies on each.",
             "The baker fills {a} boxes with {b} cookies each and sends them away.",
             "How many cookies does the baker have now?"),
    Scenario("{name} collects {a} eggs.", "{name} collects {b} eggs a day for {a} days.",
             ("{name} finds {a} more eggs.", "{other} gives {name} {a} eggs."),
             ("{name} uses {a} eggs for a cake.", "{name} sells {a} eggs to {other}."),
             "{name} buys {a} cartons with {b} eggs in each.", "{name} sells {a} cartons with {b} eggs in each.",
             "How many eggs does {name} have now?"),
    Scenario("{name} has {a} dollars.", "{name} earns {b} dollars a day for {a} days.",
             ("{name} gets {a} dollars from {other}.", "{name} earns {a} more dollars."),
             ("{name} spends {a} dollars on a book.", "{name} pays {other} {a} dollars."),
             "{name} sells {a} toys for {b} dollars each.", "{name} buys {a} tickets that cost {b} dollars each.",
             "How many dollars does {name} have now?"),
    Scenario("A library has {a} books.", "A library has {a} shelves with {b} books on each shelf.",
             ("The library gets {a} new books.", "{name} donates {a} books to the library."),
             ("{name} borrows {a} books.", "The library gives {a} old books to a school."),
             "The library adds {a} shelves with {b} books on each.",
             "The library lends {a} classes {b} books each.", "How many books are in the library now?"),
)
RELATIVES = ("mother", "father", "aunt", "uncle", "grandmother", "grandfather", "cousin", "neighbour")


def _int(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]; rng.random() scaled is ~4x faster than rng.randint, and 200k problems call it
    about two million times."""
    return lo + int(rng.random() * (hi - lo + 1))


def _pick(rng: random.Random, options: Sequence[T]) -> T:
    return options[int(rng.random() * len(options))]


OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                             "x": lambda a, b: a * b}


@dataclass(frozen=True)
class Ref:
    """An operand that is the result of an earlier solution line (its index)."""

    line: int


Operand = int | Ref


class Chain:
    """A worked solution as operations on numbers of the problem and earlier results (`Ref`), not as text: written
    out plainly (`render()`) or with one result off (`render(slip=...)`), the error carried through every later
    line the way a person's slip is."""

    def __init__(self) -> None:
        self.ops: list[tuple[Operand, str, Operand]] = []
        self.results: list[int] = []

    def value(self, x: Operand) -> int:
        return self.results[x.line] if isinstance(x, Ref) else x

    def add(self, a: Operand, op: str, b: Operand) -> Ref:
        """Append the line `a op b = result`; returns the reference to its result."""
        self.ops.append((a, op, b))
        self.results.append(OPS[op](self.value(a), self.value(b)))
        return Ref(len(self.ops) - 1)

    def render(self, slip: tuple[int, int] | None = None) -> tuple[list[str], list[int]]:
        """(solution lines, their results); slip = (line, delta) adds delta to that line's result."""
        results: list[int] = []
        lines = []
        for i, (a, op, b) in enumerate(self.ops):
            x, y = (results[v.line] if isinstance(v, Ref) else v for v in (a, b))
            results.append(OPS[op](x, y) + (slip[1] if slip and slip[0] == i else 0))
            lines.append(f"{x} {op} {y} = {results[-1]}.")
        return lines, results


def _story(rng: random.Random, d: Difficulty, steps: int) -> tuple[list[str], Chain]:
    """(sentences, solution) of a quantity story with exactly `steps` operations."""
    sc, i = _pick(rng, SCENARIOS), _int(rng, 0, len(NAMES) - 1)
    name, other = NAMES[i], NAMES[(i + _int(rng, 1, len(NAMES) - 1)) % len(NAMES)]  # two different names
    fill = functools.partial(str.format, name=name, other=other)
    chain = Chain()
    value: Operand
    if rng.random() < 0.6:
        a, b = _int(rng, 2, d.max_factor), _int(rng, 2, d.max_operand)
        value, sentences = chain.add(a, "x", b), [fill(sc.groups, a=a, b=b)]
    else:
        value = _int(rng, 10, d.max_operand)
        sentences = [fill(sc.has, a=value)]
    while len(chain.ops) < steps:
        grouped = steps - len(chain.ops) >= 2 and rng.random() < 0.5
        sign = _pick(rng, "+-")
        if grouped:
            a, b = _int(rng, 2, d.max_factor), _int(rng, 2, d.max_operand)
            if sign == "-" and a * b > chain.value(value):
                sign = "+"
            part = chain.add(a, "x", b)
            value = chain.add(value, sign, part)
            sentences.append(fill(sc.add_groups if sign == "+" else sc.sub_groups, a=a, b=b))
        else:
            if sign == "-" and chain.value(value) < 2:
                sign = "+"
            a = _int(rng, 2, d.max_operand if sign == "+" else min(chain.value(value), d.max_operand))
            value = chain.add(value, sign, a)
            sentences.append(fill(_pick(rng, sc.add if sign == "+" else sc.sub), a=a))
    sentences.append(fill(sc.question))
    return sentences, chain


def _ages(rng: random.Random, d: Difficulty, steps: int) -> tuple[list[str], Chain]:
    """(sentences, solution) of an age chain: each relative's age follows from the previous one's."""
    name = _pick(rng, NAMES)
    people = [name, *(f"{name}'s {r}" for r in rng.sample(RELATIVES, steps))]
    chain = Chain()
    value: Operand = _int(rng, 3, 15)
    sentences = [f"{name} is {value} years old."]
    for prev, person in zip(people, people[1:]):
        age = chain.value(value)
        op = _pick(rng, ("x" if age * 2 < 100 else "") + "+" + ("-" if age > 2 else ""))
        if op == "x":
            b = _int(rng, 2, min(9, d.max_factor))
            sentences.append(f"{person.capitalize()} is {b} times as old as {prev}.")
        elif op == "+":
            b = _int(rng, 2, min(40, d.max_operand))
            sentences.append(f"{person.capitalize()} is {b} years older than {prev}.")
        else:
            b = _int(rng, 1, min(age - 1, d.max_operand))
            sentences.append(f"{person.capitalize()} is {b} years younger than {prev}.")
        value = chain.add(value, op, b)
    sentences.append(f"How old is {people[-1]}?")
    return sentences, chain


def _write(lines: list[str], answer: int) -> str:
    return " ".join(lines) + f" The answer is \\boxed{{{answer}}}."


def make_chain(rng: random.Random, d: Difficulty = Difficulty()) -> tuple[str, Chain]:
    """(problem text, its worked solution as a Chain)."""
    steps = _pick(rng, d.steps)
    make: Callable = _ages if rng.random() < 1 / (len(SCENARIOS) + 1) else _story
    sentences, chain = make(rng, d, steps)
    return " ".join(sentences), chain


def make_problem(rng: random.Random, d: Difficulty = Difficulty()) -> dict[str, str]:
    """One problem: {"problem", "solution", "answer"} (answer as a decimal string)."""
    problem, chain = make_chain(rng, d)
    lines, results = chain.render()
    return {"problem": problem, "solution": _write(lines, results[-1]), "answer": str(results[-1])}


def slip(rng: random.Random, chain: Chain) -> tuple[int, int]:
    """A (line, delta) slip for `chain.render`: one result off by 1, 2 or 10 either way, chosen so that no line of the
    slipped solution goes negative."""
    while True:
        line, delta = _int(rng, 0, len(chain.ops) - 1), _pick(rng, SLIP_DELTAS)
        if min(chain.render((line, delta))[1]) >= 0:
            return line, delta


@functools.cache
def _chains(split: str, d: Difficulty) -> tuple[tuple[str, Chain], ...]:
    """(problem, solution) pairs of a split: "test" is 500 distinct problems, "train" never contains one of them."""
    if split == "test":
        rng, out, seen = random.Random(TEST_SEED), [], set()
        while len(out) < TEST_SIZE:
            problem, chain = make_chain(rng, d)
            if problem not in seen:
                seen.add(problem)
                out.append((problem, chain))
        return tuple(out)
    if split == "train":
        held_out = {problem for problem, _ in _chains("test", d)}
        rng, out = random.Random(TRAIN_SEED), []
        while len(out) < TRAIN_SIZE:
            problem, chain = make_chain(rng, d)
            if problem not in held_out:
                out.append((problem, chain))
        return tuple(out)
    raise ValueError(f"arithmetic task split must be 'train' or 'test', got {split!r}")


def make_rows(split: str, d: Difficulty = Difficulty(), slip_rate: float = 0.0) -> list[dict[str, str]]:
    """The rows of `split` ("train" or "test") at difficulty `d`; the same every call. With `slip_rate`, that share of
    the worked solutions (drawn with a fixed seed) carries one slip (`slip`); `answer` always stays the true one."""
    rng, rows = random.Random(SLIP_SEED), []
    for problem, chain in _chains(split, d):
        lines, results = chain.render(slip(rng, chain) if slip_rate and rng.random() < slip_rate else None)
        rows.append({"problem": problem, "solution": _write(lines, results[-1]), "answer": str(chain.results[-1])})
    return rows


def rows(split: str) -> list[dict[str, str]]:
    """Data source `sse_rl.tasks.arithmetic:rows` at the default difficulty."""
    return make_rows(split)


def slipped_rows(split: str) -> list[dict[str, str]]:
    """Data source `sse_rl.tasks.arithmetic:slipped_rows`: `rows` with SLIP_RATE of the solutions slipped, the
    imperfect teacher the one-GPU demo's SFT learns from (GRPO then rewards only the true answer)."""
    return make_rows(split, slip_rate=SLIP_RATE)


def rows_with_ids(split: str, d: Difficulty = Difficulty()) -> list[dict[str, str]]:
    """`make_rows` with each row's `id` ("test-17"), the problem id an `sse-rl eval` of the split records."""
    return [{"id": f"{split}-{i}", **row} for i, row in enumerate(make_rows(split, d))]


def write_split(split: str, path: str | Path, d: Difficulty = Difficulty()) -> Path:
    """Write `split` as jsonl (id, problem, solution, answer) for `sse-rl eval --data-file`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows_with_ids(split, d):
            f.write(json.dumps(row) + "\n")
    return path


def build_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> str:
    """Train a byte-level BPE (Qwen chat template) on train problems and solutions, split numbers into single
    digits, save it to `out_dir` and return the dir (`model.init.tokenizer: sse_rl.tasks.arithmetic:build_tokenizer`).

    Digits as tokens: the model then learns carries digit by digit instead of memorising a token per number; the
    BPE still learns merges of digits, which the digit split leaves unused.
    """
    from tokenizers import pre_tokenizers

    from sse_rl.tokenizer import train_tokenizer

    texts = [text for row in make_rows("train")[:TOKENIZER_TEXTS]
             for text in (f"user\n{row['problem']}", f"assistant\n{row['solution']}")]  # the chat turns' words
    tokenizer = train_tokenizer(texts, out_dir, vocab_size=vocab_size)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sse_rl.tasks.arithmetic", description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--out", required=True, help="jsonl file to write")
    args = parser.parse_args(argv)
    path = write_split(args.split, args.out)
    print(f"wrote {len(make_rows(args.split))} {args.split} problems to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation problem sets: AIME 2024, AIME 2025 and MATH-500 from the Hugging Face hub, or local jsonl/json/parquet
files.

Every source becomes a list of `Problem(id, problem, answer)`; a problem is text or, from a local file, a list of
chat messages (TRL's conversational / verl's `prompt`). Columns of local files are named by key or dotted path
(`reward_model.ground_truth`). Gold answers are normalised once here (integers lose leading zeros and a trailing
degree sign, surrounding `$` go), so the grader, majority vote and reports all see the same string.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sse_rl.data import DATA_FILE_SUFFIXES, Message, as_messages, column, is_messages, read_data_file


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str | list[Message]  # text, or the whole prompt as chat messages
    answer: str


@dataclass(frozen=True)
class HubSource:
    """One split of a hub dataset and which of its columns hold the problem, the answer and the id."""

    repo: str
    split: str
    problem_field: str
    answer_field: str
    id_field: str | None = None  # None: ids are "<id_prefix><row + 1>"
    config: str | None = None
    id_prefix: str = ""


# The usual hub copies (see the eval section of the README): H4's AIME 2024 (30 rows, AoPS-derived), OpenCompass'
# AIME 2025 (two 15-problem configs, contest order) and H4's MATH-500 (the PRM800K test split).
BENCHMARKS: dict[str, tuple[HubSource, ...]] = {
    "aime24": (HubSource("HuggingFaceH4/aime_2024", "train", "problem", "answer", id_field="id"),),
    "aime25": (
        HubSource("opencompass/AIME2025", "test", "question", "answer", config="AIME2025-I", id_prefix="2025-I-"),
        HubSource("opencompass/AIME2025", "test", "question", "answer", config="AIME2025-II", id_prefix="2025-II-"),
    ),
    "math500": (HubSource("HuggingFaceH4/MATH-500", "test", "problem", "answer", id_field="unique_id"),),
}

_INTEGER = re.compile(r"[+-]?\d+")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?$")


def normalize_answer(answer: object) -> str:
    """Canonical gold string: trimmed, no surrounding `$`, integers without leading zeros or a degree sign."""
    text = str(answer).strip().strip("$").strip()
    bare = _DEGREE.sub("", text).strip()
    if _INTEGER.fullmatch(bare):
        return str(int(bare))
    return text


def load_benchmark(name: str, data_file: str | Path | None = None, problem_column: str = "problem",
                   answer_column: str = "answer") -> list[Problem]:
    """The problems of benchmark `name`: from `data_file` (its problem and answer columns) when given, else from its
    hub sources."""
    if data_file is not None:
        return load_problems_file(data_file, problem_column, answer_column)
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)} or pass a --data-file")
    return [p for source in BENCHMARKS[name] for p in load_hub_source(source)]


def load_hub_source(source: HubSource) -> list[Problem]:
    """Rows of one hub split (or a local dataset folder) mapped through the source's field names."""
    import datasets

    rows = datasets.load_dataset(source.repo, source.config, split=source.split)
    where = f"{source.repo}" + (f" ({source.config})" if source.config else "") + f" split {source.split!r}"
    problems = []
    for index, row in enumerate(rows):
        row_id = f"{source.id_prefix}{index + 1}" if source.id_field is None else None
        problems.append(_problem_from_row(row, where, index, source.problem_field, source.answer_field,
                                          source.id_field, row_id))
    return _check_unique(problems, where)


def load_problems_file(path: str | Path, problem_column: str = "problem", answer_column: str = "answer",
                       ) -> list[Problem]:
    """Problems from a .jsonl, .json or .parquet file with a problem and an answer column (keys or dotted paths;
    optionally `id`); the file is read as `sse_rl.data.read_data_file` reads training data, so its errors name the
    file and line."""
    path = Path(path)
    if path.suffix not in DATA_FILE_SUFFIXES:
        raise ValueError(f"data file {path}: expected a {', '.join(DATA_FILE_SUFFIXES)} file")
    rows = read_data_file(path)
    problems = [_problem_from_row(row, str(path), i, problem_column, answer_column, "id", str(i + 1))
                for i, row in enumerate(rows)]
    return _check_unique(problems, str(path))


def _problem_from_row(row: dict, where: str, index: int, problem_field: str, answer_field: str,
                      id_field: str | None, default_id: str | None) -> Problem:
    """Validate one row; errors name the source, the row (1-based) and the field."""
    for name in (problem_field, answer_field):
        value = column(row, name)
        if value is None or not str(value).strip():
            raise ValueError(f"{where} row {index + 1}: field {name!r} is missing or empty "
                             f"(row has fields {sorted(row)})")
    problem = column(row, problem_field)
    if not (isinstance(problem, str) or is_messages(problem)):
        raise TypeError(f"{where} row {index + 1}: field {problem_field!r} must be a string or a list of chat "
                        f"messages, got {type(problem).__name__}")
    problem_id = row.get(id_field) if id_field else None
    problem_id = default_id if problem_id is None else str(problem_id)
    if problem_id is None:
        raise ValueError(f"{where} row {index + 1}: field {id_field!r} is missing (row has fields {sorted(row)})")
    return Problem(id=problem_id, problem=problem if isinstance(problem, str) else as_messages(problem),
                   answer=normalize_answer(column(row, answer_field)))


def _check_unique(problems: list[Problem], where: str) -> list[Problem]:
    seen: set[str] = set()
    for index, problem in enumerate(problems):
        if problem.id in seen:
            raise ValueError(f"{where} row {index + 1}: duplicate id {problem.id!r}")
        seen.add(problem.id)
    return problems

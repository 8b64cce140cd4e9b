"""The completions file of an eval run: one JSON line per graded sample, appended as samples finish.

It is the run's only state: `--resume` reads it back and skips every (benchmark, problem, sample) already in it.
A run killed in the middle of a write leaves at most one torn last line; reopening drops it (that sample is redone).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

SampleKey = tuple[str, str, int]  # (benchmark, problem id, sample index)


@dataclass
class SampleRecord:
    benchmark: str
    problem_id: str
    sample: int
    gold: str
    completion: str
    pred: str | None  # the grader's normalised extracted answer
    score: float | None  # the grader's score; None when the grader could not grade (e.g. a gold it cannot parse)
    correct: bool
    num_tokens: int
    finish_reason: str  # "stop", or "length" when cut at max_tokens

    @property
    def key(self) -> SampleKey:
        return (self.benchmark, self.problem_id, self.sample)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class CompletionStore:
    """Append-only jsonl of `SampleRecord`s with resume; with path None it only keeps the records in memory."""

    def __init__(self, path: str | Path | None, resume: bool) -> None:
        self.path = Path(path) if path is not None else None
        self._records: dict[SampleKey, SampleRecord] = {}
        if self.path is None:
            return
        if self.path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} already holds completions: pass --resume to continue that run, "
                                      f"or choose another --out")
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # The text after the last newline is empty for a clean file, a torn record after a kill mid-write.
        complete, torn = lines[:-1], lines[-1]
        for number, line in enumerate(complete, start=1):
            try:
                record = SampleRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"{self.path} line {number} is not a sample record ({err}); "
                                 f"delete that line to resume") from None
            self._records[record.key] = record
        if torn:
            with self.path.open("r+b") as f:
                f.truncate(len(data) - len(torn))

    def __contains__(self, key: SampleKey) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def append(self, records: list[SampleRecord]) -> None:
        """Write records and flush them to disk, so a kill right after loses none of them."""
        if records and self.path is not None:
            lines = "".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n" for r in records)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        for record in records:
            self._records[record.key] = record

    def records(self, benchmark: str) -> list[SampleRecord]:
        return [r for r in self._records.values() if r.benchmark == benchmark]

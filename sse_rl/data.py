"""Prompt datasets and the resumable sampler that walks them.

Choices:
1) A source is an HF hub id (`org/name`, loaded with `datasets`), a local `.jsonl` / `.json` / `.parquet` file, or a
   generator `pkg.mod:fn` called as fn(split) -> list of row dicts (synthetic tasks such as the toy task).
2) Every row is checked up front: a row missing a template field or the answer column fails the run before any
   engine starts, with the row number and the field name in the message (or is dropped and counted, on request).
3) Reward functions see every column of the row plus `answer` (the configured answer column, as text: a JSON number
   becomes its decimal string, so string-comparing rewards see "42" whether the file wrote 42 or "42").
4) Local files are read as written, row by row (`read_data_file`): no column-wide type inference, so one integer
   answer among strings changes nothing else; an empty, malformed or non-UTF-8 file fails naming the file and line.
5) The sampler is epoch-exact: each prompt once per epoch, in an order fixed by (seed, epoch), and its whole state
   is two integers, saved with every checkpoint.
"""
from __future__ import annotations

import importlib
import json
import logging
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
# Benchmarks that evaluate the policy; training on them would contaminate every reported number.
EVAL_BENCHMARKS = ("aime24", "aime25", "aime_2024", "aime_2025", "math500", "math-500", "math_500")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Prompt:
    index: int  # row number in its dataset
    text: str  # the rendered prompt
    columns: dict[str, Any]  # the row's columns + `answer`, passed to the reward functions
    ids: list[int] = field(default_factory=list)  # token ids, set by `encode_prompts`


def import_function(spec: str) -> Callable:
    """The function a recipe names as "pkg.mod:fn" (a data generator, a tokenizer builder); errors name the spec."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{spec!r}: no module named {err.name!r}") from None
    except ImportError as err:
        raise ValueError(f"{spec!r}: module {module_name!r} failed to import: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: module {module_name!r} has no function {name!r}")
    return fn


def is_function_spec(source: str) -> bool:
    """Whether `source` names a function ("pkg.mod:fn") rather than a file, a directory or a hub id."""
    return ":" in source and not Path(source).exists()


def check_source(source: str) -> None:
    """Raise naming the problem when `source` cannot be read, without reading it: a "pkg.mod:fn" whose module or
    function is missing, a local data file or directory that does not exist. Hub ids are not looked up (a download)."""
    path = Path(source).expanduser()
    if is_function_spec(source):
        import_function(source)
    elif (path.suffix in DATA_FILE_SUFFIXES or source.startswith((".", "/", "~"))) and not path.exists():
        raise FileNotFoundError(f"dataset file {source} does not exist")


def read_rows(source: str, split: str, subset: str) -> list[dict[str, Any]]:
    """Rows of a local jsonl/json/parquet file, an HF hub dataset split, or a `pkg.mod:fn` returning fn(split)."""
    if is_function_spec(source):
        return [dict(row) for row in import_function(source)(split)]
    if Path(source).suffix in DATA_FILE_SUFFIXES:
        return read_data_file(source)
    import datasets

    return [dict(row) for row in datasets.load_dataset(source, subset or None, split=split)]


def read_data_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a local .jsonl, .json (JSON lines, or one array of objects) or .parquet file, each as written.

    `datasets` would infer one type per column, turning "7" into 7 when another row holds an integer; reading row by
    row keeps every value as the file wrote it. Errors (missing, empty, unreadable, non-UTF-8, malformed, a line that
    is not an object) name the file and, where there is one, the line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_json_rows(path, _utf8_text(path))
    if not rows:
        raise ValueError(f"data file {path} is empty (no rows)")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"data file {path}: not a readable parquet file ({err})") from None


def _utf8_text(path: Path) -> str:
    """The file as text (a leading BOM dropped); bytes that are not UTF-8 fail naming the line they are on."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"data file {path} line {line}: not UTF-8 (byte 0x{data[err.start]:02x}); "
                         "re-save the file as UTF-8") from None


def _read_json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """JSON lines (blank lines skipped), or for a .json file whose text starts with `[` one array of objects."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"data file {path} line {err.lineno}: not valid JSON ({err.msg})") from None
        return [_json_object(row, path, f"item {i}") for i, row in enumerate(rows)]
    rows = []
    # split on "\n" only: str.splitlines also splits at U+2028 and the like, which JSON strings may hold as written
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            where = f"data file {path} line {number}"
            raise ValueError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
        rows.append(_json_object(row, path, f"line {number}"))
    return rows


def _json_object(row: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"data file {path} {where}: expected a JSON object, got {type(row).__name__}")
    return row


def as_text(value: Any) -> Any:
    """A column value as the text rewards and trainers see: a number as its decimal string (42 -> "42"), anything
    else unchanged (strings, and the lists or objects a structured answer may be)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def template_fields(template: str) -> list[str]:
    """The row columns a `str.format` prompt template reads."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def load_prompts(source: str, *, split: str, subset: str, template: str, answer_column: str,
                 tokenizer: Any | None = None, chat_template: bool = False,
                 drop_incomplete: bool = False) -> list[Prompt]:
    """Load a dataset and render every row's prompt.

    Args:
        source: HF hub id, local .jsonl/.parquet path, or `pkg.mod:fn`.
        template: `str.format` template over the row's columns.
        answer_column: column holding the reference answer, exposed to rewards as `answer`.
        tokenizer: needed only with `chat_template=True`.
        drop_incomplete: skip rows missing a field (logged) instead of raising ValueError naming row and field.
    """
    fields = template_fields(template)
    if not fields:
        raise ValueError(f"data.prompt_template {template!r} uses no column; write e.g. '{{problem}}'")
    rows = read_rows(source, split, subset)
    prompts, dropped = [], 0
    for i, row in enumerate(rows):
        missing = [name for name in (*fields, answer_column) if row.get(name) is None]
        if missing and drop_incomplete:
            dropped += 1
            continue
        if missing:
            raise ValueError(f"dataset {source} row {i}: missing field {missing[0]!r} (columns: {', '.join(row)}); "
                             "check data.prompt_template / data.answer_column, or set data.drop_incomplete=true")
        text = template.format(**row)
        if chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        prompts.append(Prompt(index=i, text=text, columns={**row, "answer": as_text(row[answer_column])}))
    if dropped:
        logger.warning("dataset %s: dropped %d of %d rows with missing fields", source, dropped, len(rows))
    if not prompts:
        raise ValueError(f"dataset {source} (split {split!r}) has no usable rows")
    return prompts


def encode_prompts(prompts: list[Prompt], tokenizer: Any, max_tokens: int, source: str) -> list[Prompt]:
    """Tokenize every prompt once; prompts longer than `max_tokens` are dropped (and counted), since the engine
    could not fit them with a full-length response."""
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
    kept = []
    for prompt, ids in zip(prompts, encoded):
        prompt.ids = ids
        if len(ids) <= max_tokens:
            kept.append(prompt)
    if len(kept) < len(prompts):
        logger.warning("dataset %s: dropped %d of %d prompts longer than %d tokens (rollout.max_model_len - "
                       "rollout.max_tokens)", source, len(prompts) - len(kept), len(prompts), max_tokens)
    if not kept:
        raise ValueError(f"dataset {source}: every prompt is longer than {max_tokens} tokens; raise "
                         "rollout.max_model_len or lower rollout.max_tokens")
    return kept


def check_not_benchmark(source: str) -> None:
    """Refuse to train on an evaluation benchmark."""
    name = Path(source).name.lower() if Path(source).suffix else source.lower()
    hit = [b for b in EVAL_BENCHMARKS if b in name]
    if hit:
        raise ValueError(f"data.train: {source!r} looks like the evaluation benchmark {hit[0]!r}; training on it "
                         "contaminates evaluation. Use a training set (e.g. MATH train, DeepScaleR).")


class EpochSampler:
    """Yields dataset indices: a fresh permutation each epoch, each index exactly once per epoch, resumable."""

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got size {size}")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        """The next `n` indices, continuing into the next epoch when this one runs out."""
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), self.size - self.position)
            out += self._order[self.position:self.position + k]
            self.position += k
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["size"], state["seed"]) != (self.size, self.seed):
            raise ValueError(f"sampler state is for a dataset of {state['size']} rows with seed {state['seed']}, "
                             f"this run has {self.size} rows and seed {self.seed}; resume with the same data and seed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)

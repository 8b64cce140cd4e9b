"""Prompt datasets and the resumable sampler that walks them.

Choices:
1) A source is an HF hub id (`org/name`, loaded with `datasets`), a local `.jsonl` / `.parquet` file, or a
   generator `pkg.mod:fn` called as fn(split) -> list of row dicts (synthetic tasks such as the toy task).
2) Every row is checked up front: a row missing a template field or the answer column fails the run before any
   engine starts, with the row number and the field name in the message (or is dropped and counted, on request).
3) Reward functions see every column of the row plus `answer` (the configured answer column).
4) The sampler is epoch-exact: each prompt once per epoch, in an order fixed by (seed, epoch), and its whole state
   is two integers, saved with every checkpoint.
"""
from __future__ import annotations

import importlib
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
    """Rows of a local jsonl/parquet file, an HF hub dataset split, or a `pkg.mod:fn` returning fn(split)."""
    import datasets

    path = Path(source)
    if is_function_spec(source):
        return [dict(row) for row in import_function(source)(split)]
    if path.suffix in DATA_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {source} does not exist")
        kind = "parquet" if path.suffix == ".parquet" else "json"
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        table = datasets.load_dataset(source, subset or None, split=split)
    return [dict(row) for row in table]


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
        prompts.append(Prompt(index=i, text=text, columns={**row, "answer": row[answer_column]}))
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

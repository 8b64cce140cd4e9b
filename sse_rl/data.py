"""Prompt datasets and the resumable sampler that walks them.

Choices:
1) A source is an HF hub id (`org/name`, loaded with `datasets`), a local `.jsonl` / `.json` / `.parquet` file, or a
   generator `pkg.mod:fn` called as fn(split) -> list of row dicts (synthetic tasks such as the toy task).
2) Every row is checked up front: a row missing a template field or the answer column fails the run before any
   engine starts, with the row number and the field name in the message (or is dropped and counted, on request).
3) Columns are named by key or by a dotted path into nested objects (`reward_model.ground_truth`, verl's layout).
   A prompt template fills its fields with text (strings, or numbers as their decimal strings); any other value
   (a list, an object, a bool) fails naming the row and field instead of rendering as Python's repr.
4) Chat messages: a template that is exactly one field (`{prompt}`) whose value is a list of {role, content}
   messages (TRL's conversational format, verl's `prompt`) is the prompt as written, and it always goes through the
   tokenizer's chat template (with the generation prompt). A text prompt goes through it as the user turn under
   `chat_template`. `system_prompt` becomes the first (system) turn of either; messages that carry a system turn of
   their own and a system prompt fail, naming the row.
5) Reward functions see the row's top-level columns as the source holds them (a nested column as its object, e.g.
   `reward_model={"ground_truth": ...}`, as TRL passes dataset columns) plus `answer`: the configured answer column
   (dotted path allowed) as text, a JSON number becoming its decimal string, so string-comparing rewards see "42"
   whether the file wrote 42 or "42".
6) Local files are read as written, row by row (`read_data_file`): no column-wide type inference, so one integer
   answer among strings changes nothing else; an empty, malformed or non-UTF-8 file fails naming the file and line.
7) The sampler is epoch-exact: each prompt once per epoch, in an order fixed by (seed, epoch), and its whole state
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


Message = dict[str, str]  # one chat turn: {"role": ..., "content": ...}


@dataclass
class Prompt:
    index: int  # row number in its dataset
    text: str  # the rendered prompt (the chat template applied to `messages`, when there are messages)
    columns: dict[str, Any]  # the row's columns + `answer`, passed to the reward functions
    ids: list[int] = field(default_factory=list)  # token ids, set by `encode_prompts`
    messages: list[Message] | None = None  # the chat turns `text` was rendered from; None for a plain-text prompt


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


def column(row: dict[str, Any], path: str) -> Any:
    """The row's value at `path`: a column name, or a dotted path into nested objects (`reward_model.ground_truth`);
    a key that itself holds the dots is found first. None when absent."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def missing_columns(row: dict[str, Any], paths: list[str]) -> list[str]:
    """The paths the row has no value at (absent or null)."""
    return [path for path in paths if column(row, path) is None]


def is_messages(value: Any) -> bool:
    """Whether `value` is a list of chat messages: objects with a string `role` and a string `content`."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def as_messages(value: list[dict[str, Any]]) -> list[Message]:
    """Chat messages without the null keys a parquet or `datasets` struct adds (a message struct holds every key
    any message has), which chat templates would see as set."""
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def text_value(value: Any, name: str, where: str) -> str:
    """A value that must be text: a string, or a number as its decimal string; anything else fails naming `where`
    (the source and row) and the field."""
    if isinstance(text := as_text(value), str):
        return text
    kind = "a list of chat messages" if is_messages(value) else type(value).__name__
    raise ValueError(f"{where}: field {name!r} must be a string, got {kind}: {str(value)[:80]}")


def template_fields(template: str) -> list[str]:
    """The row columns (dotted paths allowed) a `str.format` prompt template reads."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class _RowFormatter(string.Formatter):
    """`str.format` over a row whose field names are column paths, each value checked to be text."""

    def __init__(self, where: str):
        self.where = where

    def get_field(self, field_name: str, args: Any, kwargs: dict[str, Any]) -> tuple[str, str]:
        value = column(kwargs, field_name)
        if value is None:
            raise ValueError(f"{self.where}: no column {field_name!r} (columns: {', '.join(kwargs)})")
        if is_messages(value):
            raise ValueError(f"{self.where}: field {field_name!r} holds chat messages, which a template with other "
                             f"text cannot fill; use the messages as the prompt with the template '{{{field_name}}}'")
        return text_value(value, field_name, self.where), field_name


def row_prompt(row: dict[str, Any], template: str, *, system_prompt: str = "", chat: bool = False,
               where: str) -> str | list[Message]:
    """The row's prompt: chat messages (to go through the chat template) or plain text.

    A template that is exactly one field whose value is a message list gives those messages; otherwise the template
    is filled with text, which with `chat` becomes the user turn. `system_prompt` is the first turn of either; a
    text prompt without `chat` cannot take one. Errors name `where` (the source and row) and the field.
    """
    fields = template_fields(template)
    value = column(row, fields[0]) if len(fields) == 1 and template == f"{{{fields[0]}}}" else None
    if is_messages(value):
        return _with_system(as_messages(value), system_prompt, where)
    text = _RowFormatter(where).format(template, **row)
    if chat:
        return _with_system([{"role": "user", "content": text}], system_prompt, where)
    if system_prompt:
        raise ValueError(f"{where}: a system prompt is set but the prompt is plain text without the chat template; "
                         "turn the chat template on or drop the system prompt")
    return text


def _with_system(messages: list[Message], system_prompt: str, where: str) -> list[Message]:
    if not system_prompt:
        return messages
    if messages[0]["role"] == "system":
        raise ValueError(f"{where}: the prompt's messages have a system turn of their own and a system prompt is set; "
                         "drop one of them")
    return [{"role": "system", "content": system_prompt}, *messages]


def chat_text(tokenizer: Any, messages: list[Message], where: str) -> str:
    """The messages through the tokenizer's chat template, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the prompts are chat messages but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_rows(rows: list[dict[str, Any]], source: str, *, template: str, answer_column: str,
                system_prompt: str = "", chat_template: bool = False, drop_incomplete: bool = False) -> list[Prompt]:
    """Every row's prompt, before any tokenizer: plain text in `text`, or chat turns in `messages` (`text` empty).

    Cheap enough to run while a recipe is checked; errors name the source, the row and the field.
    """
    fields = template_fields(template)
    if not fields:
        raise ValueError(f"data.prompt_template {template!r} uses no column; write e.g. '{{problem}}'")
    prompts, dropped = [], 0
    for i, row in enumerate(rows):
        missing = missing_columns(row, [*fields, answer_column])
        if missing and drop_incomplete:
            dropped += 1
            continue
        if missing:
            raise ValueError(f"dataset {source} row {i}: missing field {missing[0]!r} (columns: {', '.join(row)}); "
                             "check data.prompt_template / data.answer_column, or set data.drop_incomplete=true")
        prompt = row_prompt(row, template, system_prompt=system_prompt, chat=chat_template,
                            where=f"dataset {source} row {i}")
        columns = {**row, "answer": as_text(column(row, answer_column))}
        if isinstance(prompt, list):
            prompts.append(Prompt(index=i, text="", columns=columns, messages=prompt))
        else:
            prompts.append(Prompt(index=i, text=prompt, columns=columns))
    if dropped:
        logger.warning("dataset %s: dropped %d of %d rows with missing fields", source, dropped, len(rows))
    if not prompts:
        raise ValueError(f"dataset {source} has no usable rows")
    return prompts


def load_prompts(source: str, *, split: str, subset: str, template: str, answer_column: str,
                 tokenizer: Any | None = None, chat_template: bool = False, system_prompt: str = "",
                 drop_incomplete: bool = False) -> list[Prompt]:
    """Load a dataset and render every row's prompt (`prompt_rows`, then the chat template for chat turns).

    Args:
        source: HF hub id, local .jsonl/.parquet path, or `pkg.mod:fn`.
        template: `str.format` template over the row's columns (dotted paths allowed), or one field holding chat
            messages.
        answer_column: column (or dotted path) holding the reference answer, exposed to rewards as `answer`.
        tokenizer: applies the chat template; needed with `chat_template=True` or message prompts.
        system_prompt: the system turn put before every prompt (chat messages or `chat_template` only).
        drop_incomplete: skip rows missing a field (logged) instead of raising ValueError naming row and field.
    """
    prompts = prompt_rows(read_rows(source, split, subset), source, template=template, answer_column=answer_column,
                          system_prompt=system_prompt, chat_template=chat_template, drop_incomplete=drop_incomplete)
    for prompt in prompts:
        if prompt.messages is not None:
            prompt.text = chat_text(tokenizer, prompt.messages, f"dataset {source}")
    return prompts


def sft_examples(rows: list[dict[str, Any]], data: Any, source: str, key: str = "data.train") -> list[dict[str, Any]]:
    """Rows as TRL SFT examples (`data`: an SFT data section), all of one kind, since TRL builds one dataset:

    - with `data.text_column`: language modeling, loss on every token: {"text"}, or {"messages"} when the column
      holds chat messages (TRL renders them with the chat template);
    - else prompt-completion, loss on the completion: the prompt as `row_prompt` gives it and the completion from
      `data.response_column`; conversational ({"prompt": messages, "completion": messages}, which TRL renders with
      the chat template) when the prompt or the completion is chat messages or `data.chat_template` is on, a text
      completion becoming the assistant turn; plain text otherwise.
    Errors name the recipe `key`, the row and `source`.
    """
    make = _text_example if data.text_column else _prompt_completion_example
    examples = [make(row, data, f"{key}: row {i} of {source}") for i, row in enumerate(rows)]
    for i, example in enumerate(examples):
        if _example_kind(example) != _example_kind(examples[0]):
            raise ValueError(f"{key}: row {i} of {source} is a {_example_kind(example)} example but row 0 is a "
                             f"{_example_kind(examples[0])} one; TRL trains on one kind per dataset")
    return examples


def _example_kind(example: dict[str, Any]) -> str:
    chat = any(isinstance(value, list) for value in example.values())
    return f"{'conversational' if chat else 'text'} {'/'.join(example)}"


def _required(row: dict[str, Any], path: str, where: str, keys: str) -> Any:
    value = column(row, path)
    if value is None:
        raise ValueError(f"{where} has no column {path!r} (columns: {', '.join(row)}); check {keys}")
    return value


def _text_example(row: dict[str, Any], data: Any, where: str) -> dict[str, Any]:
    value = _required(row, data.text_column, where, "data.text_column")
    if is_messages(value):
        return {"messages": as_messages(value)}
    return {"text": text_value(value, data.text_column, where)}


def _prompt_completion_example(row: dict[str, Any], data: Any, where: str) -> dict[str, Any]:
    keys = "data.prompt_template / data.response_column"
    for path in template_fields(data.prompt_template):
        _required(row, path, where, keys)
    response = _required(row, data.response_column, where, keys)
    chat = data.chat_template or is_messages(response)
    prompt = row_prompt(row, data.prompt_template, system_prompt=data.system_prompt, chat=chat, where=where)
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": text_value(response, data.response_column, where)}
    if is_messages(response):
        return {"prompt": prompt, "completion": as_messages(response)}
    return {"prompt": prompt,
            "completion": [{"role": "assistant", "content": text_value(response, data.response_column, where)}]}


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

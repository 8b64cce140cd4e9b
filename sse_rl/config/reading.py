"""Reading a recipe: YAML plus dotted overrides into a dataclass tree, and the resolved tree written back.

Choices:
1) Overrides are YAML scalars (`train.lr=3e-4`, `rollout.max_tokens=64`, `reward.functions.0.weight=0.5`).
2) Types, bounds (`bounded` fields) and unknown keys are checked while the tree is built, and every problem is
   collected under its dotted key instead of stopping at the first one; `RecipeError` raises them together.
3) The resolved recipe is written to the run directory as YAML (`write_recipe`), so a run can be repeated from it.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

R = TypeVar("R")
RESOLVED_FILE = "config.yaml"  # the resolved recipe in a train / sft / distill run directory
TrackerName = Literal["tensorboard", "wandb", "trackio", "mlflow"]  # run.report_to of every recipe (sse_rl.trackers)


class RecipeError(ValueError):
    """All problems of a recipe, one per line, each starting with its dotted key."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid recipe:\n  " + "\n  ".join(errors))


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A field with numeric bounds, checked when the recipe is built."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-6` as a string; recipes mean a float (YAML 1.2 reads it as one)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value (or None after an error)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, errors)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return None
        return [_convert(args[0], v, f"{key}.{i}", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return dict(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    return float(value) if tp is float else value


def _check_bounds(f: dataclasses.Field, value: Any, key: str, errors: list[str]) -> None:
    if value is None or not f.metadata:
        return
    for name, ok in (("ge", lambda b: value >= b), ("gt", lambda b: value > b), ("le", lambda b: value <= b)):
        bound = f.metadata.get(name)
        if bound is not None and not ok(bound):
            op = {"ge": ">=", "gt": ">", "le": "<="}[name]
            errors.append(f"{key}: must be {op} {bound}, got {value!r}")


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys and bad values are appended to `errors`."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            errors.append(f"{prefix + '.' if prefix else ''}{name}: unknown key; valid keys of {where}: "
                          f"{', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _convert(hints[name], data[name], key, errors)
        _check_bounds(f, value, key, errors)
        if value is not None or data[name] is None:
            kwargs[name] = value
    return cls(**kwargs)


def build_recipe(cls: type[R], raw: dict[str, Any]) -> tuple[R, list[str]]:
    """A recipe of kind `cls` from a mapping (parsed YAML, or a command's flags), with the problems found: bad
    types and bounds (the field keeps its default) and unknown keys."""
    errors: list[str] = []
    return _build(cls, raw, "", errors), errors


def _is_index(node: Any, part: str) -> bool:
    return isinstance(node, list) and part.isdigit() and int(part) < len(node)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` to the raw YAML mapping; the value is parsed as a YAML scalar."""
    if "=" not in assignment:
        raise RecipeError([f"{assignment}: overrides are key=value, e.g. train.lr=1e-5"])
    key, text = assignment.split("=", 1)
    *path, last = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(path):
        if isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        elif _is_index(node, part):
            node = node[int(part)]
        else:
            raise RecipeError([f"{'.'.join(path[:i + 1])}: no such entry (from override {assignment!r})"])
    value = yaml.load(text, Loader=_Loader) if text.strip() else ""
    if isinstance(node, dict):
        node[last] = value
    elif _is_index(node, last):
        node[int(last)] = value
    else:
        raise RecipeError([f"{key}: no such entry (from override {assignment!r})"])


def read_raw(path: str | Path | None, overrides: list[str]) -> dict:
    """The mapping a recipe YAML holds (empty with `path=None`), overrides applied; a missing file, a file that is not
    a mapping or a malformed override raises at once."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist (see recipes/ for examples)")
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
        if not isinstance(raw, dict):
            raise RecipeError([f"recipe: {path} must hold a YAML mapping, got {type(raw).__name__}"])
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def write_recipe(recipe: Any, out_dir: Path) -> None:
    """The resolved recipe as OUT_DIR/config.yaml (OUT_DIR created), so the run can be repeated from it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESOLVED_FILE).write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))

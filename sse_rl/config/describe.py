"""Every key of a recipe schema with its default and meaning, for `sse-rl train|sft|distill --help`.

The meaning is the schema's own comment on the field (the comment after it, with its continuation lines, or else the
comment block just above it), so the keys are documented once, where the defaults are.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from typing import Any


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the class source: the trailing comment of the field's line and the comment-only
    lines under it indented past the field, else the comment block right above the field at the field's indent."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}  # a base's fields are found in the base's own source
    out = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in names or line.lstrip().startswith("#") or name in out:
            continue
        indent = len(line) - len(line.lstrip())
        parts = []
        if number in comments and not line.lstrip().startswith("#"):
            parts.append(comments[number])
            below = number + 1
            while below in comments and lines[below - 1].lstrip().startswith("#") and \
                    len(lines[below - 1]) - len(lines[below - 1].lstrip()) > indent:
                parts.append(comments[below])
                below += 1
        else:
            above = number - 1
            while above in comments and lines[above - 1].lstrip().startswith("#") and \
                    len(lines[above - 1]) - len(lines[above - 1].lstrip()) == indent:
                parts.insert(0, comments[above])
                above -= 1
        out[name] = " ".join(parts)
    return out


def _dataclass_in(hint: Any) -> tuple[type | None, str]:
    """(the dataclass a field holds, "" or "[]" for a list of them), or (None, "") for a plain value."""
    if dataclasses.is_dataclass(hint):
        return hint, ""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        found = [a for a in args if dataclasses.is_dataclass(a)]
        return (found[0], "") if found else (None, "")
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None, ""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return json.dumps(value, default=str)


def recipe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML/JSON, meaning) for every leaf field of a recipe dataclass, sections walked."""
    hints = typing.get_type_hints(cls)
    comments = {}
    for base in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(base):
            comments.update({k: v for k, v in field_comments(base).items() if v})
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section, suffix = _dataclass_in(hints[f.name])
        if section is not None:
            if comments.get(f.name):
                rows.append((key + suffix, _default(f) if suffix else "(section)", comments[f.name]))
            rows.extend(recipe_keys(section, f"{key}{suffix}."))
        else:
            rows.append((key, _default(f), comments.get(f.name, "")))
    return rows


def keys_help(cls: type, width: int = 118) -> str:
    """The recipe keys as an argparse epilog: one key per line with its default, then its meaning wrapped below."""
    out = ["recipe keys (dotted key = default: meaning); set any of them in the YAML or as key=value:"]
    for key, default, meaning in recipe_keys(cls):
        out.append(f"  {key} = {default}")
        if meaning:
            out.extend(textwrap.wrap(meaning, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out)


def recipe_parser(prog: str, description: str, schema: type, example: str) -> argparse.ArgumentParser:
    """The command line every recipe command shares: the recipe, its overrides, --dry-run, and the keys as epilog."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=keys_help(schema),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"recipe YAML, e.g. {example}")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value overrides of the keys below, e.g. out_dir=runs/a")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe, its reward functions and its data's first rows, print them, and exit "
                             "(nothing is written, Ray and vLLM do not start)")
    return parser

"""`sse-rl train|sft|distill --help` lists every recipe key with its default and meaning, read from the schema."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sse_rl.config import DistillRecipe, Recipe, SFTRecipe
from sse_rl.config.describe import keys_help, recipe_keys


@dataclass
class Inner:
    depth: int = 3  # how deep
    # a block above
    # on two lines
    width: float = 0.5


@dataclass
class Outer:
    name: str = "x"  # a trailing comment
                     # continued under it
    # about the next field, not the previous one's continuation
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)  # a list of sections


@dataclass
class Child(Inner):
    extra: bool = False  # only in the child


def test_comments_are_read_from_the_schema_source():
    assert recipe_keys(Outer) == [
        ("name", '"x"', "a trailing comment continued under it"),
        ("inner", "(section)", "about the next field, not the previous one's continuation"),
        ("inner.depth", "3", "how deep"),
        ("inner.width", "0.5", "a block above on two lines"),
        ("items[]", "[]", "a list of sections"),
        ("items[].depth", "3", "how deep"),
        ("items[].width", "0.5", "a block above on two lines"),
    ]
    assert ("depth", "3", "how deep") in recipe_keys(Child)  # inherited fields keep the base's comment


@pytest.mark.parametrize("recipe", [Recipe, SFTRecipe, DistillRecipe])
def test_every_recipe_key_has_a_meaning(recipe):
    missing = [key for key, _, meaning in recipe_keys(recipe) if not meaning]
    assert not missing, f"{recipe.__name__} keys without a comment in the schema: {missing}"


@pytest.mark.parametrize(("command", "key"), [("train", "algo.loss_agg"), ("sft", "train.epochs"),
                                              ("distill", "logits.temperature")])
def test_the_commands_help_lists_the_keys(command, key, capsys):
    from sse_rl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"  {key} = " in out and "recipe keys" in out


def test_help_wraps_to_the_terminal_width():
    assert all(len(line) <= 120 for line in keys_help(Recipe).splitlines())

"""load_reward: built-in names, module:function, file.py:function, entry points, and errors that name the problem."""
import sys
import textwrap

import pytest
from sse_rl.rewards import BUILTINS, RewardSpecError, format_reward, load_reward, math_accuracy, overlong


def test_builtins():
    assert load_reward("math_accuracy") is math_accuracy
    assert load_reward("format") is format_reward
    assert load_reward("overlong") is overlong
    assert sorted(BUILTINS) == ["format", "math_accuracy", "overlong"]


def test_module_function():
    assert load_reward("sse_rl.rewards.math_reward:math_accuracy") is math_accuracy
    with pytest.raises(RewardSpecError, match="no module named 'no_such_pkg'"):
        load_reward("no_such_pkg.rewards:fn")
    with pytest.raises(RewardSpecError, match="no module named 'sse_rl.rewards.nope'"):
        load_reward("sse_rl.rewards.nope:fn")
    with pytest.raises(RewardSpecError, match=r"has no function 'acc' \(functions there: .*math_accuracy"):
        load_reward("sse_rl.rewards.math_reward:acc")
    with pytest.raises(RewardSpecError, match="'BOXED' is a str, not a function"):
        load_reward("sse_rl.rewards.math_reward:BOXED")


def test_file_function(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        def brevity(prompts, completions, **columns):
            return [1.0 / (1 + len(c)) for c in completions]
    """))
    fn = load_reward(f"{path}:brevity")
    assert fn(["p", "p"], ["", "abc"]) == [1.0, 0.25]
    assert load_reward(f"{path}:brevity") is fn  # imported once
    with pytest.raises(RewardSpecError, match=r"has no function 'short' \(functions there: brevity\)"):
        load_reward(f"{path}:short")
    with pytest.raises(RewardSpecError, match="missing.py' does not exist"):
        load_reward(f"{tmp_path}/missing.py:brevity")


def test_entry_point(tmp_path, monkeypatch):
    """A real installed-distribution layout (dist-info with entry_points.txt) on sys.path."""
    (tmp_path / "ext_rewards.py").write_text(
        "def shout(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    dist = tmp_path / "ext_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sse_rl.rewards]\nshout = ext_rewards:shout\nbroken = ext_rewards:gone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("shout")(["p"], ["c"]) == [1.0]
    assert "ext_rewards" in sys.modules
    with pytest.raises(RewardSpecError, match="entry point 'ext_rewards:gone' failed to load"):
        load_reward("broken")
    with pytest.raises(RewardSpecError, match=r"unknown reward 'shouty'.*'math_accuracy'.*\['broken', 'shout'\]"):
        load_reward("shouty")


@pytest.mark.parametrize("spec", ["", "  ", None, 3])
def test_bad_spec_type(spec):
    with pytest.raises(RewardSpecError, match="non-empty string"):
        load_reward(spec)

"""`load_reward(spec)`: one place that turns a reward name or path into a TRL-signature callable.

Spec forms, tried in this order:
1) a built-in name: `math_accuracy`, `format`, `overlong`;
2) `package.module:function` or `path/to/file.py:function` (anything with a colon);
3) a name registered by an installed package in the entry-point group `sse_rl.rewards`, e.g. in its pyproject:
   `[project.entry-points."sse_rl.rewards"] my_reward = "my_pkg.rewards:my_reward"`.
Every failure raises `RewardSpecError` naming the spec and the missing module, file or function.
"""
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from sse_rl.rewards.math_reward import math_accuracy
from sse_rl.rewards.shaping import format_reward, overlong

ENTRY_POINT_GROUP = "sse_rl.rewards"
BUILTINS: dict[str, Callable] = {"math_accuracy": math_accuracy, "format": format_reward, "overlong": overlong}


class RewardSpecError(ValueError):
    """A reward spec that cannot be resolved to a callable."""


def load_reward(spec: str) -> Callable:
    """The reward function named by `spec` (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"a reward spec must be a non-empty string, got {spec!r}")
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" in spec:
        target, _, name = spec.rpartition(":")
        module = _load_file(target, spec) if target.endswith(".py") else _import_module(target, spec)
        return _get_function(module, name, spec)
    return _from_entry_point(spec)


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise RewardSpecError(f"reward {spec!r}: no module named {e.name!r}") from e
        raise RewardSpecError(f"reward {spec!r}: module {target!r} failed to import: {e}") from e


def _load_file(target: str, spec: str) -> ModuleType:
    """Import a .py file once, under a name derived from its absolute path (so two `rewards.py` never clash)."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise RewardSpecError(f"reward {spec!r}: file {str(path)!r} does not exist")
    name = f"_sse_rl_user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _get_function(module: ModuleType, name: str, spec: str) -> Callable:
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise RewardSpecError(f"reward {spec!r}: module {module.__name__!r} has no function {name!r} "
                              f"(functions there: {', '.join(defined) or 'none'})")
    if not callable(fn):
        raise RewardSpecError(f"reward {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _from_entry_point(spec: str) -> Callable:
    found = entry_points(group=ENTRY_POINT_GROUP)
    matches = [ep for ep in found if ep.name == spec]
    if not matches:
        installed = sorted(ep.name for ep in found)
        raise RewardSpecError(
            f"unknown reward {spec!r}: built-ins are {sorted(BUILTINS)}, installed ({ENTRY_POINT_GROUP!r} entry "
            f"points) are {installed}; or give 'package.module:function' or 'path/to/file.py:function'"
        )
    try:
        fn = matches[0].load()
    except Exception as e:
        raise RewardSpecError(f"reward {spec!r}: entry point {matches[0].value!r} failed to load: {e}") from e
    if not callable(fn):
        raise RewardSpecError(f"reward {spec!r}: entry point {matches[0].value!r} is not callable")
    return fn

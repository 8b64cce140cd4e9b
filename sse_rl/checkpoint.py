"""Atomic run-state checkpoints: HF weights, optimizer, scheduler, RNG, the data position and the recipe.

Layout: RUN/checkpoints/step_000012/{model/ (HF save_pretrained + tokenizer), trainer.pt, state.json, config.yaml,
manifest.json} and RUN/checkpoints/latest (the name of the newest checkpoint, for people and tools).

Choices:
1) A checkpoint is written into `step_N.tmp`, then renamed: a crash mid-save leaves the previous one intact, and a
   half-written directory is never mistaken for a checkpoint (the rename is atomic).
2) manifest.json, written last, lists every file with its size. A checkpoint is intact when each listed file has its
   size and state.json parses; sizes, not hashes, because hashing a large model's weights and optimizer costs a full
   read per save, while what crashes and full disks leave behind is missing or truncated files.
3) Resuming takes the newest intact checkpoint; `scan` also says which newer ones it skipped and why. A damaged
   checkpoint is kept (for the user to inspect) until a save of the same step replaces it.
4) The run's resolved recipe (RUN/config.yaml) is copied into each checkpoint: a resume compares against the recipe
   the saved weights were trained with.
5) Only the newest `keep` intact checkpoints are kept.
6) Loading the trainer state keeps the optimizer hyperparameters and the scheduler's base lr of the recipe being run,
   so a resume with an accepted recipe change trains with the new values; with an unchanged recipe they are equal.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sse_rl.config.reading import RESOLVED_FILE

STATE_FILE = "state.json"
TRAINER_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
ROOT_DIR = "checkpoints"  # RUN/checkpoints


def _root(run_dir: str | Path) -> Path:
    return Path(run_dir) / ROOT_DIR


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(path: Path) -> None:
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    _write_atomic(path / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (a missing or truncated file, a garbled state.json), or None."""
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (the save did not finish)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is garbled ({err})"
    for name, size in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if (got := (path / name).stat().st_size) != size:
            return f"{name} has {got} bytes, the manifest says {size}"
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is garbled ({err})"
    return None


def _candidates(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first (step_N.tmp are unfinished saves, never candidates)."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def save(run_dir: str | Path, step: int, write_trainer: Callable[[Path], None], state: dict[str, Any],
         keep: int) -> Path:
    """Write checkpoint `step`: `write_trainer(dir)` fills in weights/optimizer, `state` goes to state.json."""
    root = _root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_trainer(tmp)
    if (Path(run_dir) / RESOLVED_FILE).is_file():
        shutil.copyfile(Path(run_dir) / RESOLVED_FILE, tmp / RESOLVED_FILE)
    _write_atomic(tmp / STATE_FILE, json.dumps({"step": step, **state}, indent=1))
    _write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _write_atomic(root / "latest", final.name)
    for old in [p for p in _candidates(root) if damage(p) is None][:-keep]:
        shutil.rmtree(old)
    return final


def scan(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of a run (or None), and the newer damaged ones skipped, each with the reason."""
    skipped = []
    for path in reversed(_candidates(_root(run_dir))):
        if (why := damage(path)) is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def latest(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run, or None."""
    return scan(run_dir)[0]


def load_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_recipe(path: str | Path) -> dict[str, Any] | None:
    """The resolved recipe stored with checkpoint `path` (None for checkpoints saved without one)."""
    file = Path(path) / RESOLVED_FILE
    return yaml.safe_load(file.read_text()) if file.is_file() else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_trainer(path: str | Path, model: Any, tokenizer: Any, weights: dict[str, torch.Tensor],
                 optimizer_state: dict[str, Any], scheduler: Any) -> None:
    """Trainer side: HF weights `weights` (full, gathered from the ranks) + tokenizer under model/, the full
    parameter-name-keyed optimizer state, scheduler and RNG in trainer.pt (reloadable on any number of ranks)."""
    path = Path(path)
    model.save_pretrained(path / "model", state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(path / "model")
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
               path / TRAINER_FILE)


def load_trainer(path: str | Path, scheduler: Any) -> dict[str, Any]:
    """Trainer side: restore scheduler and RNG; returns the full optimizer state for the ranks to shard, its
    hyperparameters and lr those of the recipe being run (module doc, choice 6)."""
    state = torch.load(Path(path) / TRAINER_FILE, weights_only=False)
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(state["scheduler"])
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]  # as LambdaLR
    scheduler.base_lrs, scheduler._last_lr = base_lrs, lrs
    for stored, current, lr in zip(state["optimizer"]["param_groups"], scheduler.optimizer.param_groups, lrs):
        stored.update({k: v for k, v in current.items() if k != "params"}, lr=lr)
    set_rng_state(state["rng"])
    return state["optimizer"]

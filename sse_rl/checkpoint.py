"""Atomic run-state checkpoints: HF weights, optimizer, scheduler, RNG and the data position.

Layout: RUN/checkpoints/step_000012/{model/ (HF save_pretrained + tokenizer), trainer.pt, state.json} and
RUN/checkpoints/latest (the name of the newest complete checkpoint).

Choices:
1) A checkpoint is written into `step_N.tmp`, then renamed: a crash mid-save leaves the previous one intact, and a
   half-written directory is never mistaken for a checkpoint (`state.json` is written last, the rename is atomic).
2) `latest` is replaced atomically after the rename; resuming without it falls back to the newest complete dir.
3) Only the newest `keep` checkpoints are kept.
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

STATE_FILE = "state.json"
TRAINER_FILE = "trainer.pt"


def _root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(".tmp") and (path / STATE_FILE).is_file()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    _write_atomic(tmp / STATE_FILE, json.dumps({"step": step, **state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _write_atomic(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if _complete(p))[:-keep]:
        shutil.rmtree(old)
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = _root(run_dir)
    pointer = root / "latest"
    if pointer.is_file() and _complete(root / pointer.read_text().strip()):
        return root / pointer.read_text().strip()
    found = sorted(p for p in root.glob("step_*") if _complete(p))
    return found[-1] if found else None


def load_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


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
    """Trainer side: restore scheduler and RNG; returns the full optimizer state for the ranks to shard."""
    state = torch.load(Path(path) / TRAINER_FILE, weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["optimizer"]

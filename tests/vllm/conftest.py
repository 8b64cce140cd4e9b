"""Fixtures of the vLLM plugin tests: tiny random SSE-H checkpoints sharing one tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from sse_rl.init_model import init_model
from sse_rl.tokenizer import build_tiny_tokenizer


@dataclass(frozen=True)
class TinyCheckpoints:
    tokenizer: Path
    w0: Path  # sse-h-tiny, seed 0
    w1: Path  # the same architecture, seed 1 (the "new weights" of a weight update)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    root = tmp_path_factory.mktemp("sse_h_tiny")
    build_tiny_tokenizer(root / "tokenizer")
    for seed in (0, 1):
        init_model("sse-h-tiny", root / f"w{seed}", tokenizer=str(root / "tokenizer"), seed=seed)
    return TinyCheckpoints(root / "tokenizer", root / "w0", root / "w1")

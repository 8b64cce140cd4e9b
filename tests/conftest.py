"""Shared pytest setup: Triton's interpreter on CPU, the `gpu` marker's skip, deterministic seeds, the path of the
shared data folder."""
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is first imported; any test module
# (vLLM, the model) may import our kernel modules first, so the variable is set here, before collection.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run on CUDA only: without a GPU they are skipped here, in one place."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"tests need the shared data folder at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    """A tiny random SSE-H policy with the toy task's character tokenizer (what the tiny recipe trains)."""
    from sse_rl.init_model import init_model
    from sse_rl.tasks.max_digit import build_tokenizer

    path = tmp_path_factory.mktemp("policy")
    init_model("sse-h-tiny", path, tokenizer=build_tokenizer(path), seed=0)
    return str(path)

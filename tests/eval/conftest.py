"""Fixtures of the eval tests: the tiny chat tokenizer (it has a chat template, so prompts go through it)."""
import pytest

from sse_rl.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))

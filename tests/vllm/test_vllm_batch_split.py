"""The SSE state backend's split of a vLLM batch into decode rows and chunk-kernel rows (host logic, no engine)."""
from __future__ import annotations

import pytest
import torch
from sse_rl.models.vllm.backend import split_rows


@pytest.mark.parametrize(("query_lens", "computed", "expected"), [
    ([1, 1, 1], [5, 9, 2], (3, 0)),  # decodes only
    ([7, 30], [0, 64], (0, 2)),  # a new prompt and a resumed chunk
    ([1, 1, 1, 5, 1], [10, 3, 0, 0, 7], (2, 3)),  # row 2 is a new 1-token prompt: it and all later rows prefill
    ([1, 4, 0, 0], [8, 0, 0, 0], (1, 1)),  # trailing zero-length rows (graph padding) are neither
    ([0, 0], [0, 0], (0, 0)),
], ids=["decodes", "new-and-resumed", "one-token-prompt", "padding", "empty"])
def test_split_rows(query_lens, computed, expected):
    assert split_rows(torch.tensor(query_lens), torch.tensor(computed)) == expected

"""The packed row of bench/bench_packed_attention.py: whole task-length sequences filling the row exactly, with the
sequence bounds and restarting positions TRL's padding-free collator gives."""
from __future__ import annotations

import torch
from bench.bench_packed_attention import LENGTH_RANGE, packed_row
from sse_rl.models.modeling import cu_seqlens_from_position_ids


def test_row_fills_the_budget_with_task_length_sequences() -> None:
    row = packed_row(4096, vocab=1024, device="cpu")
    cu = row["cu_seq_lens_q"]
    assert row["input_ids"].shape == (1, 4096) and int(cu[-1]) == 4096
    lengths = cu.diff()[:-1]  # the last sequence is cut to fit
    assert int(lengths.min()) >= LENGTH_RANGE[0] and int(lengths.max()) <= LENGTH_RANGE[1]
    assert torch.equal(cu_seqlens_from_position_ids(row["position_ids"]).to(torch.int32), cu)
    assert row["max_length_q"] == int(cu.diff().max())

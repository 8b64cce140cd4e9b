"""Rollouts -> packed micro-batches: sequences laid back to back (no padding), cut by a token budget.

Choices:
1) A micro-batch is one row `[1, L]` with `cu_seqlens` and per-sequence `position_ids`, the model's packed path;
   a sequence is never split, so its recurrent state never crosses a micro-batch either.
2) Bins are filled first-fit by decreasing length (fewest micro-batches for the budget); a sequence longer than the
   budget gets a micro-batch of its own rather than failing the step.
3) Micro-batches are dealt to ranks largest first onto the rank with the fewest tokens, so ranks finish together.
4) Everything the loss needs per completion token is flattened here (`targets`, `target_pos`, logprobs,
   advantages, weights, position in the response), so the trainer only gathers logits at `target_pos`.
5) The engine's recorded SSE routes (issue #28) travel per input position, aligned with `input_ids`: [1, L, S, K]
   uint8, NO_ROUTE wherever a sequence has none (the last sampled token, prefix-cache hits, a sequence without a
   record); a micro-batch none of whose sequences has routes carries None.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from sse_rl.models.layers import NO_ROUTE


@dataclass
class Sequence:
    """The trainer's view of one completion."""

    prompt_ids: list[int]
    completion_ids: list[int]
    rollout_logprobs: list[float]  # engine logprob of each completion token
    advantage: float
    weight: float  # loss weight of each of its completion tokens (aggregation); 0 = no loss
    # the engine's SSE partitions per position of prompt + completion, uint8 [<= len, S, K] (choice 5); None = none
    routes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class MicroBatch:
    input_ids: Tensor  # [1, L] int64, sequences back to back
    position_ids: Tensor  # [1, L] int64, restarting at 0 for each sequence
    cu_seqlens: Tensor  # [S+1] int64 sequence boundaries in [0, L]
    target_pos: Tensor  # [N] int64 positions whose logits predict `targets` (one per completion token)
    targets: Tensor  # [N] int64 completion tokens
    rollout_logp: Tensor  # [N] fp32
    advantages: Tensor  # [N] fp32
    weights: Tensor  # [N] fp32
    seq_ids: Tensor  # [N] int64 sequence index within this micro-batch
    response_pos: Tensor  # [N] int64 position of each completion token in its response (0 = the first)
    routes: Tensor | None = None  # [1, L, S, K] uint8 engine routes aligned with input_ids (choice 5)
    aux_weight: float = 1.0  # this micro-batch's share of all packed tokens (weights the router aux loss)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> MicroBatch:
        """This micro-batch with its tensors on `device`."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


def _bins(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: lists of sequence indices whose lengths sum to <= budget (or one long sequence)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def _routes(seqs: list[Sequence], length: int) -> Tensor | None:
    """The sequences' routes laid back to back as their tokens are: [1, L, S, K], NO_ROUTE where none (choice 5)."""
    recorded = [s.routes for s in seqs if s.routes is not None]
    if not recorded:
        return None
    out = np.full((length, *recorded[0].shape[1:]), NO_ROUTE, dtype=np.uint8)  # [L, S, K]
    start = 0
    for seq in seqs:
        if seq.routes is not None:
            n = min(len(seq.routes), len(seq))
            out[start:start + n] = seq.routes[:n]
        start += len(seq)
    return torch.from_numpy(out)[None]


def _collate(seqs: list[Sequence]) -> MicroBatch:
    ids, pos, bounds = [], [], [0]
    target_pos, targets, logp, adv, weights, seq_ids, response_pos = [], [], [], [], [], [], []
    for s, seq in enumerate(seqs):
        start, n_prompt = bounds[-1], len(seq.prompt_ids)
        if not seq.completion_ids or n_prompt == 0:
            raise ValueError(f"sequence {s} has {n_prompt} prompt and {len(seq.completion_ids)} completion tokens; "
                             "both must be non-empty")
        ids += seq.prompt_ids + seq.completion_ids
        pos += list(range(len(seq)))
        bounds.append(start + len(seq))
        # completion token j sits at start + n_prompt + j and is predicted by the logits one position earlier
        target_pos += range(start + n_prompt - 1, start + n_prompt - 1 + len(seq.completion_ids))
        targets += seq.completion_ids
        logp += seq.rollout_logprobs
        adv += [seq.advantage] * len(seq.completion_ids)
        weights += [seq.weight] * len(seq.completion_ids)
        seq_ids += [s] * len(seq.completion_ids)
        response_pos += range(len(seq.completion_ids))
    long, f32 = torch.long, torch.float32
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=long), position_ids=torch.tensor([pos], dtype=long),
        cu_seqlens=torch.tensor(bounds, dtype=long), target_pos=torch.tensor(target_pos, dtype=long),
        targets=torch.tensor(targets, dtype=long), rollout_logp=torch.tensor(logp, dtype=f32),
        advantages=torch.tensor(adv, dtype=f32), weights=torch.tensor(weights, dtype=f32),
        seq_ids=torch.tensor(seq_ids, dtype=long), response_pos=torch.tensor(response_pos, dtype=long),
        routes=_routes(seqs, len(ids)),
    )


def pack(seqs: list[Sequence], token_budget: int, num_ranks: int = 1) -> list[list[MicroBatch]]:
    """Pack sequences into micro-batches of <= token_budget tokens, dealt over `num_ranks` ranks.

    Returns one list of micro-batches per rank (a rank may get none when there are fewer bins than ranks).
    """
    for s in seqs:
        if len(s.rollout_logprobs) != len(s.completion_ids):
            raise ValueError(f"a sequence has {len(s.completion_ids)} completion tokens but "
                             f"{len(s.rollout_logprobs)} rollout logprobs")
        if s.routes is not None and (s.routes.ndim != 3 or len(s.routes) > len(s)):
            raise ValueError(f"a sequence of {len(s)} tokens has routes of shape {s.routes.shape}; expected "
                             "[positions <= tokens, SSE layers, K]")
    bins = _bins([len(s) for s in seqs], token_budget)
    micro = [_collate([seqs[i] for i in b]) for b in bins]
    total = sum(m.num_tokens for m in micro)
    for m in micro:
        m.aux_weight = m.num_tokens / total
    per_rank: list[list[MicroBatch]] = [[] for _ in range(num_ranks)]
    loads = [0] * num_ranks
    for mb in sorted(micro, key=lambda m: -m.num_tokens):
        r = loads.index(min(loads))
        per_rank[r].append(mb)
        loads[r] += mb.num_tokens
    return per_rank

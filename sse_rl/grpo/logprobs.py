"""Token logprobs and entropy from logits: one log-sum-exp serves both (under torch.compile, one fused pass)."""
from __future__ import annotations

import torch
from torch import Tensor


def logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """log softmax(logits / T)[target] [N] fp32 (differentiable; the engine's processed logprobs use the same T) and
    the entropy of softmax(logits / T) [N] fp32 (detached: a metric), from logits [N, V] and targets [N]."""
    scaled = logits.float() / temperature  # [N, V]
    lse = torch.logsumexp(scaled, dim=-1)  # [N]
    logp = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    x, lse = scaled.detach(), lse.detach()
    return logp, lse - (torch.exp(x - lse[:, None]) * x).sum(-1)

"""Token logprobs and entropy from logits, without materialising a full log-softmax copy per token twice."""
from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[target]: [N, V], [N] -> [N] fp32 (the engine's processed logprobs use the same T)."""
    logits = logits.float() / temperature  # [N, V]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [N]


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / T) per row: [N, V] -> [N] fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V]
    return -(logp.exp() * logp).sum(-1)  # [N]

"""What one GRPO step reports from the trainer ranks: `StepStats`, typed, each field saying how ranks combine.

Where the fields come from:
1) The policy loss fills the loss fields of one micro-batch (`PolicyLoss`), as 0-d fp32 tensors that stay on the
   device; the trainer adds the entropy and router aux sums of its forward.
2) The trainer merges its micro-batches with the same rules as ranks (sums add, extremes take max / min), reads all
   of them in one go (`on_host`: each read of a device value waits for the GPU), and sets the step's own fields:
   gradient norm, update counts, lr, where its time went, GPU memory.
3) The controller merges the ranks (`merge`, rank 0 first) and logs `to_metrics()`, the train/* and time/train_*
   rows of metrics.jsonl, and the mismatch/* rows (`sse_rl.grpo.mismatch`: |rollout - trainer logprob| over the
   tokens that carry loss weight, its p99 from a summed histogram, by position in the response, the sequence-level
   KL estimates, and the route-flip rate where the engines record routes).
How ranks combine (`Combine`): SUM for token counts and sums over tokens (the loss weights already normalise the
loss over the whole mini-batch, so the sums over ranks are the single-process values); MAX / MIN for extremes and
for per-rank timings and memory (the slowest rank, the fullest GPU); RANK0 for values every rank holds alike (the
all-reduced gradient norm, update counts, the scheduler's lr). A vector field (a histogram) sums elementwise; a
field no part measured (None) is left out of the combination.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from sse_rl.grpo.mismatch import BUCKET_NAMES, quantile


class Combine(Enum):
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    RANK0 = "rank 0"


def _max(a: Any, b: Any) -> Any:
    return torch.maximum(a, b) if isinstance(a, Tensor) else max(a, b)


def _min(a: Any, b: Any) -> Any:
    return torch.minimum(a, b) if isinstance(a, Tensor) else min(a, b)


_OPS: dict[Combine, Callable[[Any, Any], Any]] = {Combine.SUM: operator.add, Combine.MAX: _max, Combine.MIN: _min}


def _stat(default: float | None, how: Combine) -> Any:
    return field(default=default, metadata={"combine": how})


# A float, or a 0-d fp32 tensor while the value is still on the trainer's device.
Value = float | Tensor
# A 1-d fp32 tensor (on the trainer's device, then on the host's CPU), or None where nothing was measured.
Vector = Tensor | None


@dataclass(slots=True)
class StepStats:
    """One trainer rank's statistics of one step, or all ranks' merged (see the module doc)."""

    # The policy loss, per micro-batch; summed over the step's updates.
    tokens: Value = _stat(0.0, Combine.SUM)  # completion tokens
    loss: Value = _stat(0.0, Combine.SUM)  # sum of the weighted token losses
    clip_low: Value = _stat(0.0, Combine.SUM)  # tokens whose gradient the lower clip bound cut
    clip_high: Value = _stat(0.0, Combine.SUM)  # tokens whose gradient the upper clip bound cut
    is_sum: Value = _stat(0.0, Combine.SUM)  # truncated importance weights, summed over tokens
    is_max: Value = _stat(0.0, Combine.MAX)
    is_min: Value = _stat(math.inf, Combine.MIN)
    kl_sum: Value = _stat(0.0, Combine.SUM)  # k3 KL to the reference, summed over tokens (0 without a KL term)
    # The rollout/trainer mismatch over tokens with loss weight (`sse_rl.grpo.mismatch`), per micro-batch.
    mismatch_hist: Vector = _stat(None, Combine.SUM)  # [E+1] |log pi_old - log pi_rollout| histogram
    mismatch_pos_sum: Vector = _stat(None, Combine.SUM)  # [4] sum of |delta| per response-position bucket
    mismatch_pos_tokens: Vector = _stat(None, Combine.SUM)  # [4] tokens per response-position bucket
    mismatch_sequences: Value = _stat(0.0, Combine.SUM)  # sequences with loss weight
    seq_kl_k1_sum: Value = _stat(0.0, Combine.SUM)  # sum over tokens of log(pi_rollout / pi_old)
    seq_kl_k3_sum: Value = _stat(0.0, Combine.SUM)  # sum over tokens of r - 1 - log r, r = pi_old / pi_rollout
    route_pairs: Value = _stat(0.0, Combine.SUM)  # (token, SSE layer) pairs the engine recorded
    route_flips: Value = _stat(0.0, Combine.SUM)  # of those, pairs whose partition set the trainer did not use
    # The trainer's forward, per micro-batch.
    entropy_sum: Value = _stat(0.0, Combine.SUM)
    aux_sum: Value = _stat(0.0, Combine.SUM)  # router balance loss, weighted by the micro-batch's token share
    # The trainer, per step.
    grad_norm: float = _stat(0.0, Combine.RANK0)  # largest of the step's updates; inf where one was not finite
    skipped: float = _stat(0.0, Combine.RANK0)  # updates skipped for a non-finite loss or gradient
    updates: float = _stat(0.0, Combine.RANK0)  # optimizer steps taken or skipped
    lr: float = _stat(0.0, Combine.RANK0)  # after the scheduler's step
    # non-finite weight entries after the step's updates; the largest count of a rank (its shard under fsdp2), so
    # above 0 wherever any rank holds one
    nonfinite_weights: Value = _stat(0.0, Combine.MAX)
    graphs_compiled: float = _stat(0.0, Combine.MAX)  # new torch.compile graphs during the step
    time_prepare: float = _stat(0.0, Combine.MAX)  # micro-batches to the device, pi_old / reference passes queued
    time_updates: float = _stat(0.0, Combine.MAX)  # forwards, backwards, optimizer steps, until the GPU is done
    time_release: float = _stat(0.0, Combine.MAX)  # giving the CUDA cache back for the engines
    # train.offload_optimizer only (None without it): the optimizer state a rank keeps in host memory between steps
    offload_gib: float | None = _stat(None, Combine.MAX)  # GiB of it moved to the host after the updates
    time_offload: float | None = _stat(None, Combine.MAX)  # copying it to the host, until done
    time_reload: float | None = _stat(None, Combine.MAX)  # copying it back at the step's start (overlaps prepare and
                                                          # the first micro-batches; device time on a GPU)
    # GPU ranks only (None on CPU).
    gpu_free_gib: float | None = _stat(None, Combine.MIN)  # free at the step's start (after the engines slept)
    gpu_peak_gib: float | None = _stat(None, Combine.MAX)  # peak allocated
    gpu_kept_gib: float | None = _stat(None, Combine.MAX)  # reserved after the step, beside the woken engines
    gpu_alloc_retries: float | None = _stat(None, Combine.MAX)  # the caching allocator ran out and retried

    @classmethod
    def merge(cls, parts: Sequence[StepStats]) -> StepStats:
        """Combine a rank's micro-batches, or the ranks' step stats (parts[0] is rank 0), field by field."""
        return cls(**{f.name: _combine(f.metadata["combine"], [getattr(p, f.name) for p in parts])
                      for f in fields(cls)})

    def on_host(self) -> StepStats:
        """The same statistics with every device value read, all in one read: scalars as floats, vectors as CPU
        tensors."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        if not tensors:
            return self
        flat = torch.cat([t.detach().float().reshape(-1) for t in tensors.values()]).cpu()
        parts = flat.split([t.numel() for t in tensors.values()])
        return dataclasses.replace(self, **{name: part.item() if t.dim() == 0 else part
                                            for (name, t), part in zip(tensors.items(), parts)})

    def to_metrics(self) -> dict[str, float]:
        """The metrics.jsonl entries of stats merged over ranks: per-token means of the sums, per-update means."""
        tokens = max(self.tokens, 1.0)
        out = {"train/loss": self.loss / self.updates, "train/entropy": self.entropy_sum / tokens,
               "train/clip_frac": (self.clip_low + self.clip_high) / tokens,
               "train/clip_low_frac": self.clip_low / tokens, "train/clip_high_frac": self.clip_high / tokens,
               "train/is_ratio_mean": self.is_sum / tokens, "train/is_ratio_max": self.is_max,
               "train/is_ratio_min": self.is_min,
               "train/aux_loss": self.aux_sum / self.updates, "train/grad_norm": self.grad_norm,
               "train/skipped_updates": self.skipped, "train/nonfinite_weights": self.nonfinite_weights,
               "train/lr": self.lr,
               "train/graphs_compiled": self.graphs_compiled,
               # the slowest rank's split of time/train (the rest of it: packing and moving the batches to the ranks)
               "time/train_prepare": self.time_prepare, "time/train_updates": self.time_updates,
               "time/train_release": self.time_release}
        if self.kl_sum:
            out["train/kl"] = self.kl_sum / tokens
        if self.offload_gib is not None:
            out.update({"train/offload_gib": self.offload_gib, "time/train_offload": self.time_offload,
                        "time/train_reload": self.time_reload})
        out.update(self._mismatch_metrics())
        if self.gpu_free_gib is not None:
            out.update({"train/gpu_free_gib": self.gpu_free_gib, "train/gpu_peak_gib": self.gpu_peak_gib,
                        "train/gpu_kept_gib": self.gpu_kept_gib, "train/gpu_alloc_retries": self.gpu_alloc_retries})
        return out

    def _mismatch_metrics(self) -> dict[str, float]:
        """mismatch/*: |delta logprob| mean, p99 and mean per response-position bucket, sequence-level KL estimates,
        and the route-flip rate where routes were recorded (module doc)."""
        out = {"mismatch/route_flip_rate": self.route_flips / self.route_pairs} if self.route_pairs else {}
        tokens = 0.0 if self.mismatch_pos_tokens is None else float(self.mismatch_pos_tokens.sum())
        if not tokens:
            return out
        key, seqs = "mismatch/abs_logprob_diff", self.mismatch_sequences
        out.update({f"{key}/mean": float(self.mismatch_pos_sum.sum()) / tokens,
                    f"{key}/p99": quantile(self.mismatch_hist, 0.99), "mismatch/tokens": tokens,
                    "mismatch/seq_kl_k1": self.seq_kl_k1_sum / seqs, "mismatch/seq_kl_k3": self.seq_kl_k3_sum / seqs})
        for name, total, count in zip(BUCKET_NAMES, self.mismatch_pos_sum.tolist(), self.mismatch_pos_tokens.tolist()):
            if count:
                out[f"{key}/{name}"] = total / count
        return out


def _combine(how: Combine, values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    if how is Combine.RANK0:
        return values[0]
    return functools.reduce(_OPS[how], values)

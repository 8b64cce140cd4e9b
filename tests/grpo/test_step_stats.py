"""StepStats: how micro-batches and ranks combine, one read for device values, and the metrics.jsonl entries."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sse_rl.step_stats import Combine, StepStats


def _rank(rank: int, **gpu: float) -> StepStats:
    """A rank's stats after a step: per-rank values differ by rank, the values every rank shares do not."""
    return StepStats(tokens=10.0 + rank, loss=0.5 + rank, clip_low=1.0, clip_high=2.0 * rank, is_sum=9.0 + rank,
                     is_max=1.5 - rank, is_min=0.5 + rank, kl_sum=0.0, entropy_sum=20.0,
                     aux_sum=0.25, grad_norm=3.0 + rank, skipped=1.0, updates=2.0, lr=1e-3 * (rank + 1),
                     graphs_compiled=float(rank), time_prepare=0.1 * (2 - rank), time_updates=1.0 + rank,
                     time_release=0.01, **gpu)


def test_ranks_combine_by_each_fields_rule():
    merged = StepStats.merge([_rank(0), _rank(1)])
    assert (merged.tokens, merged.loss, merged.clip_high, merged.is_sum) == (21.0, 2.0, 2.0, 19.0)  # sums
    assert (merged.is_max, merged.graphs_compiled, merged.time_prepare, merged.time_updates) == (1.5, 1.0, 0.2, 2.0)
    assert merged.is_min == 0.5  # min
    # a rank with non-finite weights (its shard under fsdp2) makes the merged count non-zero
    assert StepStats.merge([StepStats(), StepStats(nonfinite_weights=3.0)]).nonfinite_weights == 3.0
    # rank 0's: every rank holds these alike (here they differ only to show whose is kept)
    assert (merged.grad_norm, merged.skipped, merged.updates, merged.lr) == (3.0, 1.0, 2.0, 1e-3)
    assert merged.gpu_free_gib is None and merged.gpu_peak_gib is None  # CPU ranks have none
    gpu = StepStats.merge([_rank(0, gpu_free_gib=70.0, gpu_peak_gib=40.0, gpu_kept_gib=9.0, gpu_alloc_retries=0.0),
                           _rank(1, gpu_free_gib=60.0, gpu_peak_gib=50.0, gpu_kept_gib=8.0, gpu_alloc_retries=2.0)])
    assert (gpu.gpu_free_gib, gpu.gpu_peak_gib, gpu.gpu_kept_gib, gpu.gpu_alloc_retries) == (60.0, 50.0, 9.0, 2.0)


def test_every_field_says_how_ranks_combine():
    assert all(isinstance(f.metadata.get("combine"), Combine) for f in dataclasses.fields(StepStats))


def test_micro_batches_merge_on_the_device_and_are_read_once():
    micro = [StepStats(tokens=torch.tensor(3.0), loss=torch.tensor(-0.25), is_max=torch.tensor(1.2),
                       is_min=torch.tensor(0.9), entropy_sum=torch.tensor(4.0)),
             StepStats(tokens=torch.tensor(5.0), loss=torch.tensor(0.5), is_max=torch.tensor(1.1),
                       is_min=torch.tensor(0.8), entropy_sum=torch.tensor(6.0))]
    merged = StepStats.merge(micro)
    assert isinstance(merged.tokens, torch.Tensor) and isinstance(merged.is_min, torch.Tensor)  # still on device
    host = merged.on_host()
    assert not any(isinstance(getattr(host, f.name), torch.Tensor) for f in dataclasses.fields(host))
    assert (host.tokens, host.loss, host.entropy_sum) == (8.0, 0.25, 10.0)
    assert host.is_max == pytest.approx(1.2) and host.is_min == pytest.approx(0.8)
    assert host.kl_sum == 0.0 and host.clip_low == 0.0  # fields no micro-batch set keep their defaults
    # a rank with no micro-batch at all (fsdp2 fillers only) reports the identities of its rules
    assert (StepStats().is_max, StepStats().is_min, StepStats().tokens) == (0.0, math.inf, 0.0)


def test_metrics_are_per_token_and_per_update_means():
    stats = StepStats.merge([_rank(0), _rank(1)])
    metrics = stats.to_metrics()
    assert list(metrics) == [  # the metrics.jsonl keys, in the order rows have them
        "train/loss", "train/entropy", "train/clip_frac", "train/clip_low_frac", "train/clip_high_frac",
        "train/is_ratio_mean", "train/is_ratio_max", "train/is_ratio_min", "train/aux_loss",
        "train/grad_norm", "train/skipped_updates", "train/nonfinite_weights", "train/lr", "train/graphs_compiled",
        "time/train_prepare", "time/train_updates", "time/train_release"]
    assert metrics["train/loss"] == 2.0 / 2 and metrics["train/aux_loss"] == 0.5 / 2  # per update
    assert metrics["train/entropy"] == 40.0 / 21 and metrics["train/is_ratio_mean"] == 19.0 / 21  # per token
    assert metrics["train/clip_frac"] == (2.0 + 2.0) / 21 and metrics["train/clip_low_frac"] == 2.0 / 21
    with_kl = dataclasses.replace(stats, kl_sum=4.2, gpu_free_gib=1.0, gpu_peak_gib=2.0, gpu_kept_gib=3.0,
                                  gpu_alloc_retries=0.0).to_metrics()
    assert with_kl["train/kl"] == pytest.approx(0.2)
    assert [k for k in with_kl if k not in metrics] == ["train/kl", "train/gpu_free_gib", "train/gpu_peak_gib",
                                                        "train/gpu_kept_gib", "train/gpu_alloc_retries"]
    assert StepStats(updates=1.0).to_metrics()["train/entropy"] == 0.0  # no tokens: divides by 1, not 0


def test_a_misspelt_field_fails_where_it_is_written():
    stats = StepStats()
    with pytest.raises(AttributeError):
        stats.gpu_peak_gb = 1.0
    with pytest.raises(AttributeError):
        _ = stats.clip_fraction
    with pytest.raises(TypeError, match="tokns"):
        StepStats(tokns=1.0)

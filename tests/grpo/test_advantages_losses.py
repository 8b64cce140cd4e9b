"""Advantage and loss math against values computed by hand, one test per variant."""
from __future__ import annotations

import math

import pytest
import torch

from sse_rl.grpo.advantages import EPS, build_advantage_fn
from sse_rl.grpo.filters import group_has_variance, loss_keep_mask
from sse_rl.grpo.logprobs import logprobs_and_entropy
from sse_rl.grpo.losses import LossInputs, PolicyLoss, build_loss_agg, k3_kl, ppo_clip_loss

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])


@pytest.mark.parametrize("scaling, half_step", [
    # group: std of (1,0,0,1) with Bessel's correction = sqrt(1/3)
    ("group", 0.5 / (math.sqrt(1 / 3) + EPS)),
    # batch: std of all 8 rewards (mean 0.75) = sqrt((6 * 0.0625 + 2 * 0.5625) / 7)
    ("batch", 0.5 / (math.sqrt(1.5 / 7) + EPS)),
    ("none", 0.5),
], ids=["group", "batch", "none"])
def test_advantages_by_hand(scaling, half_step):
    adv = build_advantage_fn(scaling)(REWARDS)
    expected = torch.tensor([[half_step, -half_step, -half_step, half_step], [0.0] * 4])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)


NAN = float("nan")


@pytest.mark.parametrize("scaling", ["group", "batch", "none"])
def test_an_unscored_completion_stays_out_of_the_baseline_and_gets_no_advantage(scaling):
    """TRL's rule for a completion every reward function returned None for: NaN reward, left out of the group's mean
    and std, advantage 0; the others get what they would without it."""
    rewards = torch.tensor([[1.0, NAN, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    adv = build_advantage_fn(scaling)(rewards)
    scored = rewards[~rewards.isnan()]
    scale = {"group": torch.tensor([1.0, 0.0, 0.0]).std() + EPS, "batch": scored.std() + EPS, "none": 1.0}[scaling]
    expected_first = (torch.tensor([1.0, 0.0, 0.0]) - 1 / 3) / scale
    torch.testing.assert_close(adv[0, [0, 2, 3]], expected_first, rtol=1e-5, atol=1e-6)
    assert adv[0, 1] == 0.0 and torch.isfinite(adv).all()


def test_variance_ignores_unscored_completions():
    values = torch.tensor([[1.0, NAN, 1.0, 1.0], [1.0, NAN, 0.0, 1.0], [NAN] * 4])
    assert group_has_variance(values).tolist() == [False, True, False]


def test_advantage_errors():
    with pytest.raises(ValueError, match="unknown std scaling 'grp'.*group, batch, none"):
        build_advantage_fn("grp")
    with pytest.raises(ValueError, match="G >= 2"):
        build_advantage_fn("group")(torch.ones(3, 1))


def test_ppo_clip_higher_by_hand():
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    logp = torch.log(ratio).requires_grad_()
    loss, low, high = ppo_clip_loss(logp, torch.zeros(5), adv, eps_low=0.2, eps_high=0.28)
    # 1.5*1 clipped to 1.28; 0.5*(-1) -> 0.8*(-1); 0.5*1 and 1.5*(-1) are the smaller (unclipped) terms; 1.1 inside
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.28, 0.8, -0.5, 1.5, -2.2]))
    assert high.tolist() == [True, False, False, False, False]
    assert low.tolist() == [False, True, False, False, False]
    loss.sum().backward()
    # d(-r A)/d logp = -r A where unclipped, 0 where clipped
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -0.5, 1.5, -2.2]))


def test_k3_kl_by_hand():
    kl = k3_kl(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    torch.testing.assert_close(kl, torch.tensor([0.5 - math.log(0.5) - 1.0, 0.0]))


@pytest.mark.parametrize("mode, expected", [
    ("token_truncate", [2.0, 2.0, 0.5, 1.5]),  # exp(log 3) capped at 2
    ("sequence_truncate", [2.0, 2.0, 0.75, 0.75]),  # seq 0: 3 * 2 = 6 -> 2; seq 1: 0.5 * 1.5
    ("none", [1.0, 1.0, 1.0, 1.0]),
], ids=["token", "sequence", "none"])
def test_is_correction_by_hand(mode, expected):
    old = torch.log(torch.tensor([3.0, 2.0, 0.5, 1.5]))
    rollout = torch.zeros(4)
    loss_fn = PolicyLoss(eps_low=0.2, eps_high=0.28, kl_coef=0.0, is_correction=mode, is_cap=2.0,
                         kl_bias_correction=False)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0])
    weights = torch.tensor([0.25, 0.25, 0.25, 0.25])
    x = LossInputs(logp=old.clone(), old_logp=old, rollout_logp=rollout, advantages=adv, weights=weights,
                   seq_ids=torch.tensor([0, 0, 1, 1]))
    loss, stats = loss_fn(x)
    stats = stats.on_host()
    # ratio 1 everywhere: per-token loss = -A * is_weight, weighted by 1/4
    assert loss.item() == pytest.approx(-sum(expected) / 4, rel=1e-6) and stats.loss == pytest.approx(loss.item())
    assert stats.is_max == pytest.approx(max(expected)) and stats.is_min == pytest.approx(min(expected))
    assert stats.is_sum == pytest.approx(sum(expected)) and stats.tokens == 4.0
    assert stats.kl_sum == 0.0  # no KL term


def test_statistics_count_only_tokens_with_loss_weight():
    old = torch.log(torch.tensor([3.0, 1.0, 1.0, 1.0]))  # the first token's ratio to the rollout is 3 (capped 2)
    x = LossInputs(logp=torch.log(torch.tensor([6.0, 1.0, 1.0, 1.0])), old_logp=old, rollout_logp=torch.zeros(4),
                   advantages=torch.ones(4), weights=torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]),
                   seq_ids=torch.tensor([0, 1, 1, 1]))
    _, stats = PolicyLoss(eps_low=0.2, eps_high=0.28, kl_coef=0.0, is_correction="token_truncate", is_cap=2.0,
                          kl_bias_correction=False)(x)
    stats = stats.on_host()  # the weightless first token (clipped, IS weight 2) is not counted
    assert stats.tokens == 3.0 and stats.clip_high == 0.0 and stats.is_max == 1.0


def test_bias_corrected_kl_is_weighted_by_the_ratio_to_pi_old():
    logp, old = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    x = LossInputs(logp=logp, old_logp=old, rollout_logp=old, advantages=torch.zeros(2), weights=torch.ones(2),
                   seq_ids=torch.zeros(2, dtype=torch.long), ref_logp=ref)
    plain = PolicyLoss(eps_low=0.2, eps_high=0.28, kl_coef=1.0, is_correction="none", is_cap=2.0,
                       kl_bias_correction=False)(x)[1].on_host().kl_sum
    corrected = PolicyLoss(eps_low=0.2, eps_high=0.28, kl_coef=1.0, is_correction="none", is_cap=2.0,
                           kl_bias_correction=True)(x)[1].on_host().kl_sum
    k3 = k3_kl(logp, ref)  # TRL: per_token_kl * exp(logp - old_logp) with use_bias_correction_kl
    assert plain == pytest.approx(float(k3.sum()), rel=1e-6)
    assert corrected == pytest.approx(float((k3 * torch.tensor([2.0, 1.0])).sum()), rel=1e-6)


def test_kl_term_and_unknown_names():
    logp = torch.log(torch.tensor([0.5]))
    x = LossInputs(logp=logp, old_logp=logp, rollout_logp=logp, advantages=torch.zeros(1), weights=torch.ones(1),
                   seq_ids=torch.zeros(1, dtype=torch.long), ref_logp=torch.log(torch.tensor([0.25])))
    loss, stats = PolicyLoss(eps_low=0.2, eps_high=0.28, kl_coef=0.1, is_correction="none", is_cap=2.0,
                              kl_bias_correction=False)(x)
    assert loss.item() == pytest.approx(0.1 * (0.5 - math.log(0.5) - 1.0), rel=1e-6)
    assert stats.kl_sum.item() == pytest.approx(0.5 - math.log(0.5) - 1.0, rel=1e-6)
    with pytest.raises(ValueError, match="unknown IS correction 'tis'; choose from token_truncate"):
        PolicyLoss(eps_low=0.2, eps_high=0.28, kl_coef=0.0, is_correction="tis", is_cap=2.0, kl_bias_correction=False)
    with pytest.raises(ValueError, match="unknown loss aggregation 'bnpo'; choose from dapo, grpo, dr_grpo"):
        build_loss_agg("bnpo", 8)


@pytest.mark.parametrize("name, expected", [
    ("dapo", [1 / 6, 1 / 6]),  # every token of the mini-batch weighs the same: 1 / (2 + 4)
    ("grpo", [1 / (2 * 2), 1 / (4 * 2)]),  # mean over a sequence's tokens, then over the 2 sequences
    ("dr_grpo", [1 / (8 * 2), 1 / (8 * 2)]),  # constant max_tokens=8 instead of the length
], ids=["dapo", "grpo", "dr_grpo"])
def test_loss_aggregation_by_hand(name, expected):
    weights = build_loss_agg(name, max_tokens=8)(torch.tensor([2, 4]))
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_filters():
    acc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert group_has_variance(acc).tolist() == [True, False, False, True]
    assert loss_keep_mask(["stop", "length", "stop"], overlong_filter=True).tolist() == [True, False, True]
    assert loss_keep_mask(["stop", "length"], overlong_filter=False).tolist() == [True, True]


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]], requires_grad=True)
    lp, ent = logprobs_and_entropy(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.75, 0.5])))
    torch.testing.assert_close(ent, torch.tensor([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2)]))
    assert not ent.requires_grad  # a metric: no gradient flows through the entropy
    lp.sum().backward()  # d log p_y / d logits = onehot(y) - softmax
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, 0.25], [0.5, -0.5]]))
    # temperature 2 halves the logits: p = (1, sqrt 3) / (1 + sqrt 3)
    lp2, _ = logprobs_and_entropy(logits, torch.tensor([1, 0]), temperature=2.0)
    torch.testing.assert_close(lp2, torch.log(torch.tensor([3 ** 0.5 / (1 + 3 ** 0.5), 0.5])))

import pytest
import torch
from conftest import load_script

grpo = load_script("GRPO/grpo.py")


def test_advantages_hand_worked():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group 2 all equal -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo.compute_advantages(rewards, group_size=4)
    s = (1 / 3) ** 0.5 + 1e-4
    assert torch.allclose(adv, torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]))


def test_advantages_dr_grpo_no_std_scaling():
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0])
    adv = grpo.compute_advantages(rewards, group_size=2, scale_rewards=False)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]))


def test_loss_on_policy_is_minus_advantage_times_length_mean():
    # ratio 1 (old = current) and no KL: sequence loss = -mean_i A_i
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    advantages = torch.tensor([2.0, -1.0])
    loss, stats = grpo.compute_loss(logprobs, logprobs.detach(), None, advantages, mask, 0.2, 0.0, "sequence", 2)
    assert loss.item() == pytest.approx(-(2.0 - 1.0) / 2)
    loss.backward()
    # d/dlogp of -A * mean_t(ratio): -A / len_i on real tokens, 0 on padding
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]]))
    assert stats["clip_fraction"] == 0.0


def test_loss_token_mode_and_k3_kl():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, stats = grpo.compute_loss(logprobs, logprobs, ref, torch.tensor([0.0]), mask, 0.2, 0.5, "token", 2)
    k3 = torch.exp(torch.tensor(-1.0)) + 1 - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = -1
    assert loss.item() == pytest.approx(0.5 * k3.item() / 2)
    assert stats["kl"] == pytest.approx(k3.item() / 2)


def test_clip_limits_positive_advantage_ratio():
    old = torch.tensor([[0.0]])
    logprobs = torch.tensor([[0.5]])  # ratio e^0.5 = 1.65 > 1.2
    loss, stats = grpo.compute_loss(logprobs, old, None, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool),
                                    0.2, 0.0, "token", 1)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clip_fraction"] == 1.0


def test_importance_weights_scale_the_policy_gradient_not_the_kl():
    # ratio 1, token mode: L = sum_t (-w_t A + beta k3_t) / 2: the weights multiply the surrogate only
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    weights = torch.tensor([[0.5, 2.0]])
    loss, _ = grpo.compute_loss(logprobs, logprobs.detach(), logprobs.detach() - 1.0, torch.tensor([3.0]), mask, 0.2,
                                0.1, "token", 2, is_weights=weights)
    k3 = torch.exp(torch.tensor(-1.0)).item() + 1 - 1  # ref - logp = -1 on both tokens
    assert loss.item() == pytest.approx((-(0.5 + 2.0) * 3.0 + 2 * 0.1 * k3) / 2)
    loss.backward()
    # d/dlogp_t: -w_t A / 2 from the surrogate, beta (1 - exp(ref - logp)) / 2 from the k3 term (unweighted)
    kl_grad = 0.1 * (1 - torch.exp(torch.tensor(-1.0)).item()) / 2
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.5 * 3 / 2 + kl_grad, -2.0 * 3 / 2 + kl_grad])

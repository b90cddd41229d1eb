"""The algorithm functions of RLOO, ReMax, RAFT and REINFORCE against hand-worked numbers."""

import dataclasses

import pytest
import torch
from conftest import load_script

grpo = load_script("GRPO/grpo.py")
rloo = load_script("RLOO/rloo.py")
remax = load_script("ReMax/remax.py")
raft = load_script("RAFT/raft.py")
reinforce = load_script("Reinforce/reinforce.py")


# --- RLOO ---------------------------------------------------------------------------------------------

def test_rloo_leave_one_out_hand_worked():
    # group 1 (1, 0, 0, 1): baseline of the first = (0 + 0 + 1) / 3, of the second = (1 + 0 + 1) / 3
    # group 2 (3, 1, 2, 2): baselines 5/3, 7/3, 2, 2
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    adv = rloo.compute_advantages(rewards, group_size=4)
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, -4 / 3, 0.0, 0.0])
    assert torch.allclose(adv, expected)


def test_rloo_pairs_and_equal_groups():
    # k = 2: each completion's baseline is the other one; a group of equal rewards gets 0 (sparse drops it)
    adv = rloo.compute_advantages(torch.tensor([3.0, 1.0, 5.0, 5.0]), group_size=2)
    assert torch.allclose(adv, torch.tensor([2.0, -2.0, 0.0, 0.0]))


def test_rloo_is_k_over_k_minus_1_times_the_group_centred_reward():
    rewards = torch.rand(24)
    centred = grpo.compute_advantages(rewards, group_size=6, scale_rewards=False)
    assert torch.allclose(rloo.compute_advantages(rewards, group_size=6), 6 / 5 * centred, atol=1e-6)


def test_rloo_loss_on_policy_with_k3_kl():
    # ratio 1: the policy-gradient part is -mean_i A_i; k3 with ref - logp = -1 is e^-1 on the real token
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -2.0], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -3.0])
    loss, stats = rloo.compute_loss(logprobs, logprobs.detach(), ref, advantages, mask, 0.2, 0.1, "sequence", 2)
    k3 = torch.exp(torch.tensor(-1.0)).item()
    assert loss.item() == pytest.approx((-1.0 + 3.0 + 0.1 * k3) / 2)
    assert stats["kl"] == pytest.approx(k3 / 3)  # token mean over the 3 real tokens
    assert stats["clip_fraction"] == 0.0
    loss.backward()
    # d/dlogp, divided by the 2 completions: sequence 1 -A / len = -1 / 2; sequence 2 -A + beta (1 - e^-1) on one token
    expected = torch.tensor([[-0.25, -0.25], [(3 + 0.1 * (1 - k3)) / 2, 0.0]])
    assert torch.allclose(logprobs.grad, expected)


def test_rloo_loss_clips_a_second_epoch():
    # ratio e^0.5 > 1.2 with A > 0: the clipped term (1.2 A) wins the min
    loss, stats = rloo.compute_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), None, torch.tensor([2.0]),
                                    torch.ones(1, 1, dtype=torch.bool), 0.2, 0.0, "token", 1)
    assert loss.item() == pytest.approx(-2.4)
    assert stats["clip_fraction"] == 1.0


# --- ReMax --------------------------------------------------------------------------------------------

def test_remax_greedy_baseline_hand_worked():
    # prompt 0: greedy reward 1, samples (1, 0, 1); prompt 1: greedy reward 0, samples (0, 0, 1)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    adv = remax.compute_advantages(rewards, torch.tensor([1.0, 0.0]), group_size=3)
    assert torch.allclose(adv, torch.tensor([0.0, -1.0, 0.0, 0.0, 0.0, 1.0]))


def test_remax_one_sample_per_prompt_as_in_the_paper():
    adv = remax.compute_advantages(torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1.0, 1.0, -3.0]), group_size=1)
    assert torch.allclose(adv, torch.tensor([-0.5, 1.0, 2.0]))


def test_remax_loss_token_mode():
    # "token": every real token weighs the same: (-A1 * 2 tokens - A2 * 1 token) / 3 tokens
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, _ = remax.compute_loss(logprobs, logprobs, None, torch.tensor([1.0, -1.0]), mask, 0.2, 0.0, "token", 3)
    assert loss.item() == pytest.approx((-2.0 + 1.0) / 3)


# --- RAFT ---------------------------------------------------------------------------------------------

def test_raft_select_best_first_of_ties():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0,  # tie between 1 and 2: the first
                            0.0, 0.0, 0.0, 0.0,  # all equal: the first of the group
                            0.2, 0.5, 0.9, 0.1])
    assert raft.select_best(rewards, group_size=4).tolist() == [1, 4, 10]


def test_raft_select_best_threshold():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.5, 0.9, 0.1])
    assert raft.select_best(rewards, 4, threshold=0.0).tolist() == [1, 10]  # strictly above: the 0-group is dropped
    assert raft.select_best(rewards, 4, threshold=0.9).tolist() == [1]
    assert raft.select_best(rewards, 4, threshold=1.0).tolist() == []


def test_raft_loss_is_mean_token_nll():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, stats = raft.compute_loss(logprobs, None, mask, 0.0, 3)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert stats["nll"] == pytest.approx(3.5 / 3)
    assert "kl" not in stats
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3], [-1 / 3, 0.0]]))


def test_raft_loss_with_k3_kl():
    logprobs = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0]])  # ref - logp = -1, then 0
    loss, stats = raft.compute_loss(logprobs, ref, torch.ones(1, 2, dtype=torch.bool), 0.5, 2)
    k3 = torch.exp(torch.tensor(-1.0)).item()
    assert loss.item() == pytest.approx((2.0 + 0.5 * k3) / 2)
    assert stats["kl"] == pytest.approx(k3 / 2)


# --- REINFORCE ----------------------------------------------------------------------------------------

def test_reinforce_sequence_kl_sums_log_ratio_over_sampled_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])  # padding is 0 in both
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    kl = reinforce.sequence_kl(logprobs, ref)
    assert torch.allclose(kl, torch.tensor([0.5 - 1.0, 0.5]))
    # the penalised reward of the script: r - beta KL
    assert torch.allclose(torch.tensor([1.0, 1.0]) - 0.1 * kl, torch.tensor([1.05, 0.95]))


def test_reinforce_whitened_advantages_hand_worked():
    # mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    adv = reinforce.compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    s = (1 / 3) ** 0.5
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert adv.mean().abs() < 1e-6 and adv.std().item() == pytest.approx(1.0)


def test_reinforce_without_whitening_is_the_raw_reward():
    rewards = torch.tensor([0.9, -0.3])
    assert torch.equal(reinforce.compute_advantages(rewards, whiten=False), rewards)
    assert torch.equal(reinforce.compute_advantages(torch.full((4,), 2.0)), torch.zeros(4))


def test_reinforce_loss_has_no_kl_term_and_clips():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, stats = reinforce.compute_loss(logprobs, logprobs.detach(), torch.tensor([2.0, -1.0]), mask, 0.2,
                                         "sequence", 2)
    assert loss.item() == pytest.approx(-(2.0 - 1.0) / 2)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]]))
    # A < 0 and ratio e^-0.5 = 0.61 < 0.8: min(rho A, 0.8 A) = 0.8 A
    loss, stats = reinforce.compute_loss(torch.tensor([[-0.5]]), torch.tensor([[0.0]]), torch.tensor([-1.0]),
                                         torch.ones(1, 1, dtype=torch.bool), 0.2, "token", 1)
    assert loss.item() == pytest.approx(0.8)
    assert stats["clip_fraction"] == 1.0


def test_reinforce_plus_plus_group_baseline_hand_worked():
    # groups (1, 0, 0, 1) and (3, 1, 2, 2): minus the group means 0.5 and 2 -> (.5, -.5, -.5, .5, 1, -1, 0, 0),
    # batch mean 0, unbiased std sqrt((4 x 0.25 + 1 + 1) / 7) = sqrt(3/7)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    centred = reinforce.group_centred(rewards, group_size=4)
    assert torch.allclose(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]))
    adv = reinforce.compute_advantages(centred)
    assert torch.allclose(adv, centred / (3 / 7) ** 0.5)
    # the batch baseline alone ranks the second group's 2s above the first group's 1s; the group baseline does not
    assert reinforce.compute_advantages(rewards)[6] > reinforce.compute_advantages(rewards)[0]
    assert adv[6] < adv[0]
    # the KL penalty comes after the group mean (as OpenRLHF's reinforce_baseline): groups (1, 0), (1, 1), KL of the
    # third completion 2, beta 0.5 -> (.5, -.5, -1, 0), mean -0.25, deviations (.75, -.25, -.75, .25), std sqrt(5/12)
    penalised = reinforce.group_centred(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2) - 0.5 * torch.tensor([0.0, 0, 2, 0])
    adv = reinforce.compute_advantages(penalised)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.75, 0.25]) / (5 / 12) ** 0.5)


# --- the scripts read alike ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", [rloo, remax, raft, reinforce], ids=lambda s: s.__name__)
def test_shared_config_fields_keep_grpo_order(script):
    """Fields that mean the same thing have the same name and order as in GRPO/grpo.py (diff-friendly)."""
    grpo_fields = [f.name for f in dataclasses.fields(grpo.Config)]
    fields = [f.name for f in dataclasses.fields(script.Config)]
    shared = [name for name in grpo_fields if name in fields]
    assert [name for name in fields if name in grpo_fields] == shared
    assert {"model", "reward_fn", "group_size", "learning_rate", "kl_coef", "ppo_epochs", "wandb"} <= set(shared)


def test_whitening_defaults():
    assert rloo.Config.whiten_advantages is False and remax.Config.whiten_advantages is False
    assert reinforce.Config.whiten_advantages is True
    assert rloo.Config.sparse is True


def test_warmup_then_cosine_schedule_by_hand():
    from nanorlhf.update import cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_schedule(optimizer, total_steps=6, floor=0.1, warmup_steps=2)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # warmup: 1/2, 2/2; then the half cosine over the 4 remaining steps: 0.1 + 0.9 * (1 + cos(pi * k / 4)) / 2
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 0.5 ** 0.5), 0.55, 0.1 + 0.45 * (1 - 0.5 ** 0.5)])
    ratio = cosine_schedule(optimizer, total_steps=10, warmup_steps=0.2)  # below 1: a fraction of the steps
    assert [ratio.lr_lambdas[0](t) for t in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])

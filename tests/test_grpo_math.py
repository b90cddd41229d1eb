from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script

from nanorlhf.config import parse_config
from nanorlhf.errors import UserError

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


# --- the variants: loss types, clip-higher, GSPO, CISPO, overlong, dynamic sampling, recipes ----------------------

def test_loss_types_aggregate_the_same_tokens_differently():
    # ratio 1, no KL; completion 1 has 2 tokens with A = 2, completion 2 has 1 token with A = -1; max_new_tokens 4
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    advantages = torch.tensor([2.0, -1.0])
    lengths = torch.tensor([2, 1])
    expected = {  # (normaliser, loss, gradient of each real token), worked by hand
        "sequence": (2, (-2.0 + 1.0) / 2, [[-2 / 2 / 2, -2 / 2 / 2], [1 / 2, 0.0]]),  # sum_i mean_t / N
        "token": (3, (-2.0 * 2 + 1.0) / 3, [[-2 / 3, -2 / 3], [1 / 3, 0.0]]),  # sum over tokens / 3 tokens
        "dr_grpo": (8, (-2.0 * 2 + 1.0) / 8, [[-2 / 8, -2 / 8], [1 / 8, 0.0]]),  # sum over tokens / (2 x 4)
    }
    for loss_type, (normalizer, value, grad) in expected.items():
        assert grpo.loss_normalizer(loss_type, lengths, max_new_tokens=4) == normalizer
        logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
        loss, _ = grpo.compute_loss(logprobs, logprobs.detach(), None, advantages, mask, 0.2, 0.0, loss_type,
                                    normalizer)
        assert loss.item() == pytest.approx(value), loss_type
        loss.backward()
        assert torch.allclose(logprobs.grad, torch.tensor(grad)), loss_type
    # Dr. GRPO's gradient per token does not depend on the completion's length; the sequence loss's does (1 / |o_i|)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_further():
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[0.22, 0.3]], requires_grad=True)  # ratios 1.246 and 1.350
    one = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo.compute_loss(logprobs, old, None, torch.tensor([1.0]), one, (0.2, 0.28), 0.0, "token", 2)
    # 1.246 < 1.28 stays (gradient -rho / 2), 1.350 is clipped at 1.28 (no gradient); symmetric 0.2 clips both at 1.2
    r1 = torch.exp(torch.tensor(0.22)).item()
    assert loss.item() == pytest.approx(-(r1 + 1.28) / 2)
    assert stats["clip_fraction"] == 0.5
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-r1 / 2, 0.0]]))
    symmetric, stats = grpo.compute_loss(logprobs, old, None, torch.tensor([1.0]), one, 0.2, 0.0, "token", 2)
    assert symmetric.item() == pytest.approx(-1.2) and stats["clip_fraction"] == 1.0
    # the lower side stays at 1 - eps_low: A < 0 with ratio e^-0.5 = 0.61 -> min(-0.61, -0.8) = -0.8 -> loss 0.8
    low, _ = grpo.compute_loss(torch.tensor([[-0.5]]), torch.zeros(1, 1), None, torch.tensor([-1.0]),
                               torch.ones(1, 1, dtype=torch.bool), (0.2, 0.28), 0.0, "token", 1)
    assert low.item() == pytest.approx(0.8)


def test_gspo_one_length_normalised_ratio_per_completion():
    # log-ratios 0.1 and -0.3 on the two real tokens (the third is padding): s = exp(-0.1) = 0.905, A = 1
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[0.1, -0.3, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    s = torch.exp(torch.tensor(-0.1)).item()
    loss, _ = grpo.compute_loss(logprobs, old, None, torch.tensor([1.0]), mask, 0.2, 0.0, "sequence", 1,
                                importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-s)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-s / 2, -s / 2, 0.0]]))  # d s / d logp_t = s / |o|
    # token-level GRPO on the same numbers: -(e^0.1 + e^-0.3) / 2 (0.741 < 0.8 is not clipped for A > 0)
    token, _ = grpo.compute_loss(logprobs, old, None, torch.tensor([1.0]), mask, 0.2, 0.0, "sequence", 1)
    assert token.item() == pytest.approx(-(torch.exp(torch.tensor(0.1)) + torch.exp(torch.tensor(-0.3))).item() / 2)
    # GSPO's clip 3e-4 / 4e-4 with A = -1: min(-0.905, -(1 - 3e-4)) -> loss 0.9997, the whole completion clipped
    logprobs.grad = None
    clipped, stats = grpo.compute_loss(logprobs, old, None, torch.tensor([-1.0]), mask, (3e-4, 4e-4), 0.0, "sequence",
                                       1, importance_sampling_level="sequence")
    assert clipped.item() == pytest.approx(1 - 3e-4)
    assert stats["clip_fraction"] == 1.0
    clipped.backward()
    assert logprobs.grad.abs().sum().item() == 0.0


def test_cispo_clips_the_weight_and_keeps_the_gradient():
    # token 1 ratio e^0.5 = 1.65 (weight capped at 1 + 0.2), token 2 ratio 1; A = 2, two tokens
    old = torch.tensor([[-1.5, -2.0]])
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    one = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo.compute_loss(logprobs, old, None, torch.tensor([2.0]), one, 0.2, 0.0, "cispo", 2)
    assert loss.item() == pytest.approx(-(1.2 * 2 * -1.0 + 1.0 * 2 * -2.0) / 2)  # -sum_t sg(w_t) A logp_t / 2
    assert stats["clip_fraction"] == 0.5
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.2 * 2 / 2, -1.0 * 2 / 2]]))
    # the clipped surrogate gives the first token no gradient at all (ratio above 1 + eps with A > 0)
    logprobs.grad = None
    grpo.compute_loss(logprobs, old, None, torch.tensor([2.0]), one, 0.2, 0.0, "token", 2)[0].backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -1.0 * 2 / 2]]))


@pytest.mark.parametrize("loss_type", ["token", "dr_grpo", "cispo"])
def test_importance_weights_multiply_every_token_level_loss(loss_type):
    # ratio 1, no KL: the gradient of token t is -w_t A / normaliser in all three
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    weights = torch.tensor([[0.5, 2.0]])
    loss, _ = grpo.compute_loss(logprobs, logprobs.detach(), None, torch.tensor([3.0]), torch.ones(1, 2, dtype=bool),
                                0.2, 0.0, loss_type, 4, is_weights=weights)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5 * 3 / 4, -2.0 * 3 / 4]]))


def test_importance_weights_multiply_gspo():
    # s = 1, A = 1, w = (0.5, 2): loss = -mean_t(w_t) s A = -1.25; d/dlogp_t = -mean(w) A s / |o| = -0.625
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo.compute_loss(logprobs, logprobs.detach(), None, torch.tensor([1.0]), torch.ones(1, 2, dtype=bool),
                                0.2, 0.0, "sequence", 1, is_weights=torch.tensor([[0.5, 2.0]]),
                                importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-1.25)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.625, -0.625]]))


def test_sparse_and_dense_give_the_same_gradient_at_kl_0():
    # 3 groups of 3: the middle one all equal (advantage 0); uneven lengths, ratios away from 1 (a second epoch)
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.0, 1.0, 1.0])
    lengths = torch.tensor([3, 1, 2, 3, 2, 1, 2, 3, 1])
    mask = torch.arange(3)[None, :] < lengths[:, None]  # (9, 3)
    current, old = -torch.rand(9, 3), -torch.rand(9, 3)
    truncated = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    variants = [("sequence", "token", False), ("token", "token", False), ("dr_grpo", "token", False),
                ("cispo", "token", False), ("sequence", "sequence", False), ("token", "token", True)]
    for loss_type, level, mask_truncated in variants:
        grads = []
        for sparse in (False, True):
            cfg = SimpleNamespace(loss_type=loss_type, sparse=sparse, mask_truncated_completions=mask_truncated,
                                  max_new_tokens=3)
            advantages = grpo.compute_advantages(rewards, 3)
            keep, normalizer = grpo.select_completions(advantages, lengths, truncated, cfg)
            logprobs = current.clone().requires_grad_(True)
            loss, _ = grpo.compute_loss(logprobs[keep], old[keep], None, advantages[keep], mask[keep], (0.2, 0.28),
                                        0.0, loss_type, normalizer, importance_sampling_level=level)
            loss.backward()
            grads.append(logprobs.grad)
            # sparse drops the equal group and the 0.5 (its group's mean); mask_truncated drops completions 5 and 6
            assert keep.sum() == ((5 - mask_truncated) if sparse else (9 - 2 * mask_truncated))
        assert torch.allclose(grads[0], grads[1], atol=1e-7), (loss_type, level)
        assert grads[0].abs().sum() > 0


def test_sparse_normaliser_counts_the_dropped_completions():
    cfg = SimpleNamespace(loss_type="token", sparse=True, mask_truncated_completions=True, max_new_tokens=10)
    advantages = torch.tensor([1.0, 0.0, -1.0, 0.0])
    lengths = torch.tensor([4, 5, 6, 10])
    truncated = torch.tensor([False, False, False, True])
    keep, normalizer = grpo.select_completions(advantages, lengths, truncated, cfg)
    assert keep.tolist() == [True, False, True, False]
    assert normalizer == 4 + 5 + 6  # the zero-advantage one counts, the masked truncated one does not
    cfg.loss_type = "sequence"
    assert grpo.select_completions(advantages, lengths, truncated, cfg)[1] == 3
    cfg.loss_type = "dr_grpo"
    assert grpo.select_completions(advantages, lengths, truncated, cfg)[1] == 3 * 10


def test_overlong_penalty_ramps_over_the_buffer():
    # max_new_tokens 10, buffer 4: free up to 6 tokens, then -0.5 x (|o| - 6) / 4
    lengths = torch.tensor([3.0, 6.0, 7.0, 9.0, 10.0])
    penalty = grpo.overlong_penalty(lengths, max_new_tokens=10, buffer=4, penalty=0.5)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, -0.125, -0.375, -0.5])


def test_informative_groups_and_refill_seeds():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0])
    assert grpo.informative_groups(rewards, 3).tolist() == [False, True, False]
    assert grpo.generation_seed(42, 7, 0) == 49  # round 0 is the step's own seed
    seeds = {grpo.generation_seed(42, step, r) for step in range(1, 1000) for r in range(4)}
    assert len(seeds) == 999 * 4  # every (step, refill round) samples with its own seed


@dataclass
class FakeCompletion:
    prompt_index: int
    token_ids: list
    truncated: bool = False


class FakeRun:
    """run.prompts.next / run.generate / run.score with scripted rewards: prompt k's group gets rewards[k]."""

    def __init__(self, group_rewards):
        self.group_rewards, self.cursor, self.seeds = group_rewards, 0, []
        self.prompts = self

    def next(self, n):
        prompts = [{"id": self.cursor + i} for i in range(n)]
        self.cursor += n
        return prompts

    def generate(self, prompts, n, seed):
        self.seeds.append(seed)
        return [FakeCompletion(i, [p["id"]] * (1 + j)) for i, p in enumerate(prompts) for j in range(n)]

    def score(self, prompts, completions):
        rewards = torch.tensor([self.group_rewards[prompts[c.prompt_index]["id"]][j % 2]
                                for j, c in enumerate(completions)], dtype=torch.float)
        return rewards, {"task": rewards}


def test_dynamic_sampling_refills_until_enough_informative_groups():
    # prompts 0-3: informative 1 and 3; refill asks ceil(2 missing x 4 seen / 2 found) = 4 prompts (4-7): 5 and 6
    # informative -> 4 groups after one refill round
    informative = {1, 3, 5, 6, 7}
    run = FakeRun({k: (0.0, 1.0) if k in informative else (1.0, 1.0) for k in range(100)})
    cfg = SimpleNamespace(group_size=2, prompts_per_step=4, dynamic_sampling=True, max_refill_rounds=3, seed=10,
                          overlong_buffer=0)
    prompts, completions, rewards, (seen, seen_rewards, parts), rounds = grpo.sample_groups(run, cfg, step=3)
    assert [p["id"] for p in prompts] == [1, 3, 5, 6]  # 7 was informative too, but the step is full
    assert rounds == 1 and run.seeds == [13, 1_000_013]
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2, 3, 3]  # re-indexed into `prompts`
    assert [c.token_ids[0] for c in completions] == [1, 1, 3, 3, 5, 5, 6, 6]
    assert rewards.tolist() == [0.0, 1.0] * 4
    assert len(seen) == 16 and len(seen_rewards) == 16 and len(parts["task"]) == 16  # the log sees all 8 groups
    # no informative group at all: max_refill_rounds full rounds, then an empty step
    run = FakeRun({k: (1.0, 1.0) for k in range(100)})
    prompts, completions, rewards, (seen, _, _), rounds = grpo.sample_groups(run, cfg, step=3)
    assert prompts == [] and completions == [] and len(rewards) == 0
    assert rounds == 3 and len(seen) == 4 * 4 * 2
    # off: one round, every group kept
    cfg.dynamic_sampling = False
    prompts, *_, rounds = grpo.sample_groups(FakeRun({k: (1.0, 1.0) for k in range(100)}), cfg, step=3)
    assert len(prompts) == 4 and rounds == 0


def test_overlong_shaping_is_a_logged_reward_part():
    run = FakeRun({k: (1.0, 1.0) for k in range(10)})  # completion j of a group has j + 1 tokens
    cfg = SimpleNamespace(group_size=2, prompts_per_step=2, dynamic_sampling=False, max_refill_rounds=0, seed=0,
                          overlong_buffer=1, overlong_penalty=0.5, max_new_tokens=2)
    _, _, rewards, (_, _, parts), _ = grpo.sample_groups(run, cfg, step=1)
    assert parts["overlong"].tolist() == [0.0, -0.5, 0.0, -0.5]
    assert rewards.tolist() == [1.0, 0.5, 1.0, 0.5]


def test_recipes_set_fields_and_explicit_flags_win():
    cfg = grpo.apply_recipe(parse_config(grpo.Config, ["--demo", "--recipe", "dapo", "--clip_eps_high", "0.3"],
                                         demo=grpo.DEMO))
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.loss_type, cfg.dynamic_sampling) == (0.2, 0.3, "token", True)
    assert cfg.kl_coef == 0.0  # the recipe's, over the demo's 0.01
    assert cfg.overlong_buffer == grpo.DEMO["max_new_tokens"] // 5
    cfg = grpo.apply_recipe(parse_config(grpo.Config, ["--recipe", "dr_grpo"]))
    assert (cfg.scale_rewards, cfg.loss_type) == (False, "dr_grpo")
    cfg = grpo.apply_recipe(parse_config(grpo.Config, ["--recipe", "gspo", "--loss_type", "token"]))
    assert (cfg.importance_sampling_level, cfg.clip_eps_low, cfg.clip_eps_high) == ("sequence", 3e-4, 4e-4)
    assert cfg.loss_type == "token"
    with pytest.raises(UserError, match="--recipe must be one of dapo, dr_grpo, gspo"):
        grpo.apply_recipe(parse_config(grpo.Config, ["--recipe", "ppo"]))

"""PPO: GAE and the clipped value loss on hand-worked numbers, the critic (second adapter + value head) on a
tiny local model, and one end-to-end run of the script on the real vLLM engine."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script

ppo = load_script("PPO/ppo.py")


def test_gae_hand_worked_and_padding_masked():
    # row 0: T = 3, score 1 on the last token; row 1: 2 tokens and a padding slot holding garbage
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta_2 = 1 - 0.3 = 0.7; delta_1 = 0.3 - 0.2 = 0.1; delta_0 = 0.2 - 0.1 = 0.1
    a2, a1 = 0.7, 0.1 + 0.95 * 0.7
    a0 = 0.1 + 0.95 * a1
    # row 1 ends at t = 1: delta_1 = 1 + 0 - 0.5 = 0.5 (no value after the last token), delta_0 = 0.5 - 0.5 = 0
    expected = torch.tensor([[a0, a1, a2], [0.95 * 0.5, 0.5, 0.0]])
    assert torch.allclose(advantages, expected)
    assert torch.allclose(returns, (expected + values) * mask)


def test_gae_with_lam_one_gives_discounted_monte_carlo_returns():
    rewards = torch.tensor([[0.5, 0.0, 2.0]])
    values = torch.tensor([[0.3, -1.0, 4.0]])  # cancel out of the returns when lam = 1
    _, returns = ppo.compute_gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.5, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[0.5 + 0.25 * 2.0, 0.5 * 2.0, 2.0]]))


def test_token_rewards_put_kl_on_every_token_and_the_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -3.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    rewards = ppo.token_rewards(torch.tensor([1.0, 2.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, -0.2 + 1.0], [-0.1 + 2.0, 0.0, 0.0]]))


def test_value_loss_clipped_hand_worked():
    # token 0 moved from its old value 0.5 to 1.0, out of the clip range [0.3, 0.7]: unclipped (1 - 2)^2 = 1,
    # clipped (0.7 - 2)^2 = 1.69, and the max takes 1.69. Token 1 stays inside the range: 0.36. Token 2 is padding.
    values = torch.tensor([[1.0, 0.6, 7.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, stats = ppo.compute_value_loss(values, old_values, returns, mask, clip_eps=0.2, normalizer=2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)
    assert stats["value_clip_fraction"] == pytest.approx(0.5)
    loss, stats = ppo.compute_value_loss(values, old_values, returns, mask, clip_eps=math.inf, normalizer=2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.36) / 2)  # inf: plain regression
    assert stats["value_clip_fraction"] == 0.0


def test_policy_loss_is_token_mean_of_clipped_surrogate():
    logprobs = torch.tensor([[0.5, 0.0, 0.0]])  # ratio e^0.5 = 1.65 > 1.2 on token 0
    advantages = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, stats = ppo.compute_loss(logprobs, torch.zeros(1, 3), advantages, mask, 0.2, normalizer=2)
    assert loss.item() == pytest.approx((-1.2 + 2.0) / 2)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 0.0, 9.0], [0.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 0.5), returns, mask) == pytest.approx(0.0)


# --- the critic on a tiny local model (no engine) -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from nanorlhf.tiny import build_tiny_policy

    texts = [f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)]
    return build_tiny_policy(str(tmp_path_factory.mktemp("tiny")), texts)


def make_critic(model_path, learning_rate=1e-2):
    from nanorlhf.critic import Critic
    from nanorlhf.policy import load_policy

    torch.manual_seed(0)
    policy = load_policy(model_path, 8, 16, 0.0, "all-linear", "float32")
    return policy, Critic(policy, pad_id=0, learning_rate=learning_rate, max_grad_norm=1.0)


def fixed_rollouts(n=32):
    """Random prompts and completions whose return is 1 when the prompt starts with an odd token, else 0."""
    from nanorlhf.rollout import Batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (int(torch.randint(4, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(3, 200, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    batch = Batch(prompt_ids=prompts, completion_ids=completions)
    lengths = torch.tensor([len(c) for c in completions])
    batch.completion_mask = torch.arange(int(lengths.max())) < lengths[:, None]
    batch.returns = torch.tensor([float(p[0] % 2) for p in prompts])[:, None] * batch.completion_mask
    return batch


def test_value_fit_lowers_the_critics_error_and_leaves_the_policy_alone(tiny_model):
    from nanorlhf.logprobs import token_budget_batches
    from nanorlhf.policy import merged_weights

    policy, critic = make_critic(tiny_model)
    batch = fixed_rollouts()
    mask = batch.completion_mask
    micro_batches = token_budget_batches([len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)],
                                         64)  # several micro-batches: gradients accumulate across them
    assert len(micro_batches) > 1

    def mse():
        values = critic.predict(batch, micro_batches)
        return (((values - batch.returns) ** 2) * mask).sum().item() / mask.sum().item()

    policy_weights = dict(merged_weights(policy))
    before = mse()
    for _ in range(10):  # what initialise_value_model does on each batch of rollouts
        batch.old_values = critic.predict(batch, micro_batches)
        critic.update(batch, micro_batches, epochs=1, loss_fn=lambda values, mb: ppo.compute_value_loss(
            values, mb.old_values, mb.returns, mb.completion_mask, math.inf, mask.sum().item()))
    after = mse()
    assert after < 0.3 * before, (before, after)
    # the policy adapter is active again, untouched, and the only trainable one outside the critic's updates
    assert policy.active_adapter == "default"
    assert all(torch.equal(w, policy_weights[name]) for name, w in merged_weights(policy))
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in name for name in trainable)


def test_critic_pads_without_a_pad_token(tiny_model):
    # a tokenizer without a pad token gives pad_id None: the critic pads as the policy's log-probs do
    from nanorlhf.critic import Critic
    from nanorlhf.policy import load_policy
    from nanorlhf.rollout import Batch

    torch.manual_seed(0)
    policy = load_policy(tiny_model, 8, 16, 0.0, "all-linear", "float32")
    critic = Critic(policy, pad_id=None, learning_rate=1e-2, max_grad_norm=1.0)
    batch = Batch(prompt_ids=[[5, 6, 7, 8], [9, 10]], completion_ids=[[11, 12, 13], [14]])
    values = critic.predict(batch, [[0, 1]])  # one micro-batch: the second sequence is 4 tokens shorter
    assert values.shape == (2, 3) and torch.isfinite(values).all()
    alone = critic.predict(batch, [[1]])  # the padding changed nothing at the real positions
    assert torch.allclose(values[1, :1], alone[1, :1], atol=1e-5)


def test_critic_is_checkpointed_and_restored(tiny_model, tmp_path):
    from nanorlhf.checkpoint import load_checkpoint, save_checkpoint
    from nanorlhf.logprobs import token_budget_batches
    from nanorlhf.update import cosine_schedule

    batch = fixed_rollouts(8)
    micro_batches = token_budget_batches([len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)],
                                         4096)
    policy, critic = make_critic(tiny_model)
    batch.old_values = critic.predict(batch, micro_batches)
    critic.update(batch, micro_batches, epochs=2, loss_fn=lambda values, mb: ppo.compute_value_loss(
        values, mb.old_values, mb.returns, mb.completion_mask, 0.2, 8))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
    saved = save_checkpoint(str(tmp_path), 1, policy, optimizer, cosine_schedule(optimizer, 10), {"step": 1},
                            critic.checkpointed())

    torch.manual_seed(1)  # a different fresh head, as in a new process
    policy2, critic2 = make_critic(tiny_model)
    optimizer2 = torch.optim.AdamW([p for p in policy2.parameters() if p.requires_grad])
    _, modules, _ = load_checkpoint(saved, policy2, optimizer2, cosine_schedule(optimizer2, 10))
    for name, part in critic2.checkpointed().items():  # what run.register does on resume
        part.load_state_dict(modules[name])
    assert torch.equal(critic2.predict(batch, micro_batches), critic.predict(batch, micro_batches))
    assert critic2.optimizer.state_dict()["state"][0]["step"] == 2


# --- end to end on the real engine ----------------------------------------------------------------------------

SCRIPT = os.path.join(ROOT, "PPO", "ppo.py")


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


PREDICTABLE_REWARD = """
def sum_reward(prompts, completions, answer, **_):
    return [int(a) / 18 for a in answer]  # the sum asked for: the prompt alone decides it, so a critic can learn it
"""


def test_demo_run_logs_ppo_metrics(tmp_path):
    output_dir = str(tmp_path / "run")
    (tmp_path / "reward.py").write_text(PREDICTABLE_REWARD)
    # value initialisation until the critic explains the returns (at most 30 rounds), then 2 PPO steps of 8 x 4
    result = run_script("--demo", "--total_episodes", "64", "--prompts_per_step", "8", "--group_size", "4",
                        "--reward_fn", f"{tmp_path / 'reward.py'}:sum_reward", "--value_init_steps", "30",
                        "--value_init_ev", "0.5", "--wandb", "false", "--output_dir", output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["engine_builds"] == 1 for r in rows)
    assert all(r["logprob_diff"] < 0.05 for r in rows)  # the engine samples with the policy adapter only
    required = {"step", "episodes", "reward_mean", "reward_std", "kl", "loss", "response_length_mean", "time_step",
                "time_generate", "time_train", "time_sync", "engine_builds", "logprob_diff", "clip_fraction",
                "value_loss", "value_clip_fraction", "explained_variance", "non_score_reward"}
    assert required <= set(rows[0])
    assert rows[-1]["kl"] is not None
    with open(os.path.join(output_dir, "value_init.jsonl")) as f:
        init_rows = [json.loads(line) for line in f]
    # it fitted round after round while the critic explained less than half the variance of new rollouts, and
    # stopped at the first round whose new rollouts it explained (measured before fitting them, not fitted after)
    *fitted, last = init_rows
    assert 2 <= len(init_rows) < 30 and [r["init_step"] for r in init_rows] == list(range(1, len(init_rows) + 1))
    assert all(r["explained_variance"] < 0.5 and r["value_loss"] > 0 for r in fitted)
    assert last["explained_variance"] >= 0.5 and last["value_loss"] is None
    assert fitted[0]["explained_variance"] == pytest.approx(0.0, abs=1e-5)  # zero head: the mean return, a constant
    assert f"explained variance {last['explained_variance']:.3f} on new rollouts after {len(fitted)} rounds " \
        "reaches --value_init_ev 0.5; PPO starts" in result.stdout
    assert os.path.exists(os.path.join(output_dir, "checkpoint-2", "critic", "adapter_model.safetensors"))


def test_value_init_at_the_cap_says_so_and_what_to_change():
    sentence = ppo.value_init_verdict(0.123, 10, 0.5, 10)
    assert sentence.startswith("value init stopped at the cap (--value_init_steps 10) with explained variance 0.123 "
                               "on new rollouts, short of --value_init_ev 0.5")
    assert "raise --value_init_steps" in sentence and "lower --value_init_ev" in sentence
    assert "PPO starts" in ppo.value_init_verdict(0.6, 3, 0.5, 10)
    assert "stopped at the cap" in ppo.value_init_verdict(float("nan"), 10, 0.5, 10)  # returns that never varied


@pytest.mark.parametrize("args, words", [
    (["--lam", "1.5"], "--gamma and --lam must lie between 0 and 1"),
    (["--value_init_steps", "-1"], "--value_init_steps must be 0 or more"),
    (["--value_init_ev", "1.5"], "--value_init_ev must be at most 1"),
    (["--no_such_field", "1"], "unknown option --no_such_field"),
])
def test_bad_input_is_one_clear_sentence(tmp_path, args, words):
    result = run_script("--demo", "--wandb", "false", "--output_dir", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

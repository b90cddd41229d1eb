"""PPO: Proximal Policy Optimization for RLHF (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155), with the
implementation details of Huang et al. 2024 (https://arxiv.org/abs/2403.17031).

Each step samples `group_size` completions for each of `prompts_per_step` prompts from a persistent
vLLM engine and scores them. Every completion token gets a reward: a KL penalty against the reference
policy, plus the completion's score on its last token. A critic (value model) estimates the return from
every token, GAE turns rewards and values into per-token advantages, the policy takes clipped-ratio steps
on them and the critic clipped regression steps on the returns. The policy is the base model plus a LoRA
adapter; the critic is a second LoRA adapter on the same frozen base plus a linear value head
(nanorlhf/critic.py); the reference policy is the base with the adapters off. After the update the
updated policy weights are pushed into the engine in place (`--weight_sync`).

Value-model initialisation: before the first PPO update the critic alone is fitted to the returns of the
initial policy's rollouts, round after round of fresh rollouts, until its explained variance on a round's new
rollouts reaches `value_init_ev` or `value_init_steps` rounds are done (logged to value_init.jsonl). Until the
critic explains the returns, the advantages built on it are mostly its error. The value head starts at zero
and the critic's output is scaled by the first scores' mean and std (fit_value_scale), so that it starts at
the mean return and one learning rate fits any reward scale (issue 30).

Differences from the paper and 2403.17031: the critic is not initialised from a reward model (with a
rule-based reward there is none) but by the value initialisation above; each of the `ppo_epochs` is one
optimizer step on the whole batch of rollouts (gradients accumulated over micro-batches), not several
mini-batches; policy and critic have separate optimizers (so no vf_coef); no pretraining-loss mix
(PPO-ptx); advantages are not whitened by default (trl whitens them: `--whiten_advantages`). The
policy's log-probs for the KL reward cost one extra forward pass before the update.

Run:  python PPO/ppo.py --demo                   (CPU, tiny model, synthetic addition task, minutes)
      python PPO/ppo.py                          (the defaults below, on one GPU)
      python PPO/ppo.py --help                   (every field; --<field> <value> overrides it)
"""

import json
import math
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `cd PPO && python ppo.py`
from nanorlhf import console, distributed, tasks  # noqa: E402
from nanorlhf.config import RunConfig, parse_config  # noqa: E402
from nanorlhf.errors import UserError, exit_on_user_error  # noqa: E402


@dataclass
class Config(RunConfig):
    # model, reward and data
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # policy base model: hub name or local folder
    reward_model: str = "OpenAssistant/reward-model-deberta-v3-large-v2"  # sequence-classification scorer, or none
    reward_fn: str = ""  # rule-based reward(s), file.py:function or module:function, comma-separated
    reward_weights: str = ""  # one weight per reward (reward model first), comma-separated; "" = all 1
    dataset: str = "Anthropic/hh-rlhf"  # hub name or local .jsonl/.json/.parquet
    prompt_field: str = "chosen"  # column with the prompt: text, chat messages, or an hh-rlhf dialogue
    max_prompt_tokens: int = 512  # longer prompts are skipped (and counted in prompts_skipped)
    # run
    output_dir: str = ""  # "" = runs/ppo-<date>-<time>
    overwrite: bool = False  # replace a run already in output_dir
    resume: str = ""  # run folder or checkpoint folder to continue from
    seed: int = 42  # step s samples with seed + s: new samples every step, the same ones on a rerun
    total_episodes: int = 20000  # completions generated over the whole run
    prompts_per_step: int = 16  # prompts per step
    group_size: int = 4  # completions per prompt (G); episodes per step = prompts_per_step x group_size
    save_every: int = 50  # checkpoint every N steps (also at the end and on Ctrl-C)
    wandb: bool = True  # log to wandb (offline when not logged in)
    wandb_project: str = "nanoRLHF"  # wandb project
    # generation (vLLM)
    max_new_tokens: int = 1500  # longest completion
    temperature: float = 0.9  # sampling temperature (the loss uses the same tempered distribution)
    top_p: float = 0.95  # nucleus sampling
    vllm_gpu_memory: float = 0.3  # share of GPU memory for the engine's weights and KV cache
    # policy (LoRA)
    dtype: str = "bfloat16"  # weights of the base model and the engine: bfloat16, float16 or float32
    lora_r: int = 64  # LoRA rank (the critic's adapter has the same)
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_target_modules: str = "all-linear"  # "all-linear" or comma-separated module names
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% slower
    # optimisation
    learning_rate: float = 1e-3  # peak learning rate, cosine decay to 10% of it (README, "A real model on a laptop")
    max_grad_norm: float = 1.0  # gradient clipping (policy and critic each)
    micro_batch_tokens: int = 8192  # token budget of one micro-batch with gradients (rows x longest; short sequences share a row)
    ppo_epochs: int = 4  # optimizer steps of the policy and of the critic on each batch of rollouts
    # PPO
    kl_coef: float = 0.05  # beta: weight of the per-token KL penalty in the reward (0 skips the reference pass)
    clip_eps: float = 0.2  # epsilon of the clipped ratio
    value_clip_eps: float = 0.2  # a value moves at most this far from its rollout-time value per update
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = False  # normalise advantages over the batch's tokens (trl does)
    value_learning_rate: float = 1e-4  # the critic's learning rate (adapter + value head), constant
    value_init_steps: int = 10  # at most this many critic-only rounds on the initial policy's rollouts before PPO
    value_init_ev: float = 0.5  # ... fewer once the critic's explained variance on new rollouts reaches this


# --demo: the shared demo defaults (tiny model, addition, exact-answer reward; see nanorlhf/tasks.py) plus these.
DEMO = {**tasks.DEMO, "total_episodes": 10240, "prompts_per_step": 16, "group_size": 8, "ppo_epochs": 2,
        "learning_rate": 2e-3, "kl_coef": 0.01, "save_every": 20, "value_learning_rate": 1e-3, "value_init_steps": 5}


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards (B, T) (2203.02155 eq. 2, with the KL penalty spread over the tokens):

        r_t = -beta (logp_t - ref_t)  +  score  if t is the completion's last token

    logp_t is the log-prob of token t under the policy that sampled it, ref_t under the reference; scores (B,).
    """
    mask = mask.float()
    rewards = torch.zeros_like(mask)
    if ref_logprobs is not None:
        rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (torch.arange(mask.shape[1], device=mask.device) * mask.bool()).amax(1)  # (B,) the last token kept
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.device)
    return rewards


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (https://arxiv.org/abs/1506.02438) on (B, T) tensors; mask marks
    the completion tokens, the value after the last one is 0:

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V_t                        (the regression target of the critic)

    Padding gets A = R = 0. lam = 1 gives the Monte-Carlo returns R_t = sum_k gamma^k r_{t+k}. Positions the
    mask leaves out inside a completion (a multi-turn episode's tool tokens) are skipped: t + 1 is the next
    position the mask keeps, so the recursion runs over the model's tokens only.
    """
    mask = mask.float()
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        kept = mask[:, t].bool()
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_advantage = torch.where(kept, advantage, next_advantage)
        next_value = torch.where(kept, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def whiten(values, mask, eps=1e-8):
    """(values - mean) / std over the completion tokens; padding stays 0."""
    mask = mask.bool()
    return (values - values[mask].mean()) / (values[mask].std() + eps) * mask


def compute_loss(logprobs, old_logprobs, advantages, mask, clip_eps, normalizer, is_weights=1.0):
    """Clipped surrogate per token (all (b, T)), summed over tokens / normalizer (the whole batch's tokens):

        rho_t = exp(logp_t - logp_old_t)
        L_t   = -w_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)
        w_t   = the importance weight trainer/sampler of token t (nanorlhf.logprobs.importance_weights)
    """
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages) * is_weights
    mask = mask.float()
    loss = (per_token * mask).sum() / normalizer
    tokens = mask.sum().clamp(min=1)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, {"clip_fraction": ((clipped * mask).sum() / tokens).item()}


def compute_value_loss(values, old_values, returns, mask, clip_eps, normalizer):
    """Clipped value loss (2403.17031, as in OpenAI's lm-human-preferences and trl), per token (all (b, T)),
    summed over tokens / normalizer:

        V_clip_t = V_old_t + clip(V_t - V_old_t, -eps_v, eps_v)
        L_t      = 1/2 max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    clip_eps = inf is the plain regression 1/2 (V_t - R_t)^2 (the value initialisation).
    """
    unclipped = (values - returns) ** 2
    clipped = (old_values + (values - old_values).clamp(-clip_eps, clip_eps) - returns) ** 2
    mask = mask.float()
    loss = 0.5 * (torch.max(unclipped, clipped) * mask).sum() / normalizer
    tokens = mask.sum().clamp(min=1)
    return loss, {"value_clip_fraction": (((clipped > unclipped).float() * mask).sum() / tokens).item()}


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the completion tokens: 1 = a perfect critic, 0 = no better than a constant."""
    mask = mask.bool()
    variance = returns[mask].var()
    return (1 - (returns[mask] - values[mask]).var() / variance).item() if variance > 0 else float("nan")


def completion_mask(batch):
    """(B, C) bool: the tokens the model sampled (not padding, not a multi-turn episode's tool tokens)."""
    return batch.loss_mask.bool()


def fit_value_scale(critic, scores):
    """Fix the critic's output as V = mean + std * head(h), from the first batch of scores that vary (return
    normalisation: OpenRLHF's critic de-normalises with a fixed mean and std too). The head then regresses
    targets of unit size, so one value_learning_rate suits a 0-1 rule-based reward and a reward model's logits
    alike, and the zero head starts at the mean return. Set once: later batches see the same function."""
    if critic.value_scale.fitted:  # the same on every rank
        return
    scores = distributed.gather(scores)
    if scores.std() > 0:
        critic.value_scale.set(scores.mean().item(), scores.std().item())


def initialise_value_model(run, critic, cfg):
    """Fit the critic alone to the returns of the initial policy's rollouts, on fresh rollouts each step, until
    it explains them: each round first measures the explained variance of the critic's values on its fresh
    rollouts (held-back data: what PPO's first advantages will see), stops if it reaches value_init_ev, and
    otherwise fits them; value_init_steps caps the fitting rounds. The policy still equals the reference, so
    the KL penalty is 0 and the return of each token is its discounted score: GAE with lam = 1. Logged to
    value_init.jsonl (metrics.jsonl keeps PPO's steps). Returns the last round's explained variance."""
    explained = float("nan")
    # rank 0 writes the log (torchrun: os.devnull elsewhere)
    with open(os.path.join(run.output_dir, "value_init.jsonl") if distributed.is_main() else os.devnull, "w") as log:
        for init_step in range(1, cfg.value_init_steps + 2):  # + 1: a last round measures the last fit
            if run.stop_agreed():  # Ctrl-C or SIGTERM: run.steps() exits before its first step
                return explained
            prompts = run.prompts.next(cfg.prompts_per_step)
            completions = run.generate(prompts, n=cfg.group_size, seed=cfg.seed - init_step)
            rewards, _ = run.score(prompts, completions)
            fit_value_scale(critic, rewards)
            batch = run.batch(prompts, completions)
            micro_batches, _ = run.micro_batches(batch)
            mask = batch.completion_mask = completion_mask(batch)
            batch.old_values = critic.predict(batch, run.micro_batches(batch, grad=False)[0]).cpu()
            _, batch.returns = compute_gae(token_rewards(rewards, None, None, mask, 0.0), batch.old_values, mask,
                                           cfg.gamma, lam=1.0)
            # the whole batch's (every rank's), so every rank takes the same decision
            explained = explained_variance(*map(distributed.gather, (batch.old_values, batch.returns, mask)))
            row = {"init_step": init_step, "reward_mean": distributed.gather(rewards).mean().item(),
                   "explained_variance": explained, "value_loss": None}
            done = explained >= cfg.value_init_ev or init_step > cfg.value_init_steps
            if not done:
                normalizer = distributed.total(mask.sum().item())  # the whole batch's tokens, over every rank
                row["value_loss"] = critic.update(batch, micro_batches, epochs=cfg.ppo_epochs, loss_fn=lambda values,
                                                  mb: compute_value_loss(values, mb.old_values, mb.returns,
                                                                         mb.completion_mask, math.inf,
                                                                         normalizer))["value_loss"]
            log.write(json.dumps(row) + "\n")
            log.flush()
            if done:
                console.say(value_init_verdict(explained, init_step - 1, cfg.value_init_ev, cfg.value_init_steps))
                break
            console.say(f"value init {init_step}/{cfg.value_init_steps}: explained variance {explained:.3f} on new "
                        f"rollouts, value loss {row['value_loss']:.4f}")
    return explained


def value_init_verdict(explained, rounds, threshold, cap):
    """The sentence that ends the value initialisation: `rounds` fitting rounds done, `explained` measured after."""
    if explained >= threshold:
        return f"value init: explained variance {explained:.3f} on new rollouts after {rounds} rounds reaches " \
               f"--value_init_ev {threshold}; PPO starts"
    return f"value init stopped at the cap (--value_init_steps {cap}) with explained variance {explained:.3f} on new " \
           f"rollouts, short of --value_init_ev {threshold}: PPO's first advantages rest on a critic that explains " \
           f"the returns less than asked; raise --value_init_steps (or --value_learning_rate), or lower " \
           f"--value_init_ev where the returns cannot be predicted better"


def main(cfg):
    from nanorlhf.critic import Critic
    from nanorlhf.run import Run

    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise UserError(f"--gamma and --lam must lie between 0 and 1, got {cfg.gamma} and {cfg.lam}")
    if cfg.value_init_steps < 0:
        raise UserError(f"--value_init_steps must be 0 or more, got {cfg.value_init_steps}")
    if not cfg.value_init_ev <= 1:
        raise UserError(f"--value_init_ev must be at most 1 (explained variance never exceeds it), got "
                        f"{cfg.value_init_ev}")
    run = Run(cfg, algo="ppo")
    critic = Critic(run.policy, run.tokenizer.pad_token_id, cfg.value_learning_rate, cfg.max_grad_norm, run.packed)
    for name, part in critic.checkpointed().items():
        run.register(name, part)  # restored here when resuming
    if run.start_step > 1:  # a resumed critic keeps the scale it was trained with (none, in older checkpoints)
        critic.value_scale.fitted.fill_(True)
    elif cfg.value_init_steps > 0:
        initialise_value_model(run, critic, cfg)
    for step in run.steps():
        # 1. take the next prompts
        prompts = run.prompts.next(cfg.prompts_per_step)
        # 2. generate G completions per prompt, with this step's seed
        completions = run.generate(prompts, n=cfg.group_size, seed=cfg.seed + step)
        # 3. score them
        rewards, reward_parts = run.score(prompts, completions)  # (N,)
        fit_value_scale(critic, rewards)  # without value initialisation: on the first scores that vary
        batch = run.batch(prompts, completions)
        micro_batches, _ = run.micro_batches(batch)
        mask = batch.completion_mask = completion_mask(batch)  # (B, C)
        # 4. log-probs under the policy and the reference (adapter off), for the KL reward; the critic's values
        batch.ref_logprobs, logprobs, kl = None, None, None
        if cfg.kl_coef > 0:
            batch.ref_logprobs = run.reference_logprobs(batch).cpu()
            logprobs = run.policy_logprobs(batch).cpu()
            kl = distributed.total(((logprobs - batch.ref_logprobs) * mask).sum().item()) / distributed.total(
                mask.sum().item())
        with run.timed("time_value"):
            batch.old_values = critic.predict(batch, run.micro_batches(batch, grad=False)[0]).cpu()
        # 5. advantages: per-token rewards (KL penalty, score on the last token), GAE on the critic's values
        rewards_per_token = token_rewards(rewards, logprobs, batch.ref_logprobs, mask, cfg.kl_coef)
        batch.advantages, batch.returns = compute_gae(rewards_per_token, batch.old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over the whole batch's tokens (every rank's, under torchrun)
            batch.advantages = distributed.on_whole_batch(whiten, batch.advantages, mask)
        # 6. loss, backward, optimizer step: the policy on the advantages, the critic on the returns
        normalizer = distributed.total(mask.sum().item())  # token mean over the whole batch (every rank's: torchrun)
        stats = run.update(batch, epochs=cfg.ppo_epochs, loss_fn=lambda logprobs, entropy, mb: compute_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.completion_mask, cfg.clip_eps, normalizer,
            is_weights=mb.is_weights))
        with run.timed("time_train"):
            stats.update(critic.update(batch, micro_batches, epochs=cfg.ppo_epochs, loss_fn=lambda values, mb:
                                       compute_value_loss(values, mb.old_values, mb.returns, mb.completion_mask,
                                                          cfg.value_clip_eps, normalizer)))
        # 7. push the updated weights into the engine, in place
        run.sync()
        # 8. log
        stats.update(explained_variance=explained_variance(*map(distributed.gather, (batch.old_values, batch.returns,
                                                                                    mask))),  # whole batch's
                     non_score_reward=(rewards_per_token.sum() - rewards.sum()).item() / len(batch))
        run.log(step, rewards, completions, kl=kl, **stats,
                **{f"reward_{name}": values.mean().item() for name, values in reward_parts.items()})


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config, demo=DEMO))

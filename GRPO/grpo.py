"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, https://arxiv.org/abs/2402.03300).

Each step samples `group_size` completions for each of `prompts_per_step` prompts from a persistent
vLLM engine, scores them, and uses each completion's reward relative to its own group as the
advantage: no value model. The policy is the base model plus a LoRA adapter; the reference policy
for the KL term is the same base with the adapter disabled. After the optimizer step the updated
weights are pushed into the engine in place (`--weight_sync`).

Differences from the paper: the KL term uses the paper's k3 estimator, but with the default
ppo_epochs=1 the policy takes one optimizer step per batch of rollouts, so the probability ratio is 1
and the clip only matters when ppo_epochs > 1 (as in trl's default). Options: `sparse` drops
completions whose advantage is exactly zero before any log-prob work (their policy-gradient term is
zero; only their KL term is lost), `scale_rewards=False` is Dr. GRPO (https://arxiv.org/abs/2503.20783),
`loss_type` averages per sequence (the paper) or per token (DAPO).

Run:  python GRPO/grpo.py --demo                 (CPU, tiny model, synthetic addition task, minutes)
      python GRPO/grpo.py                        (the defaults below, on one GPU)
      python GRPO/grpo.py --help                 (every field; --<field> <value> overrides it)
"""

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `cd GRPO && python grpo.py`
from nanorlhf import tasks  # noqa: E402
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
    output_dir: str = ""  # "" = runs/grpo-<date>-<time>
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
    lora_r: int = 64  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_target_modules: str = "all-linear"  # "all-linear" or comma-separated module names
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% slower
    # optimisation
    learning_rate: float = 6e-6  # peak learning rate, cosine decay to 10% of it
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_tokens: int = 8192  # token budget of one micro-batch (samples x longest, padding included)
    ppo_epochs: int = 1  # optimizer steps on each batch of rollouts
    # GRPO
    kl_coef: float = 0.01  # beta: weight of the KL penalty to the reference policy (0 skips the reference pass)
    clip_eps: float = 0.2  # epsilon of the clipped ratio
    scale_rewards: bool = True  # divide by the group's reward std; False = Dr. GRPO
    whiten_advantages: bool = False  # off: the group mean is already the baseline
    sparse: bool = False  # drop completions whose advantage is 0 before any log-prob or backward work
    loss_type: str = "sequence"  # "sequence": mean over each completion's tokens, then over completions; "token"


# --demo: the shared demo defaults (tiny model, addition, exact-answer reward; see nanorlhf/tasks.py) plus these.
DEMO = {**tasks.DEMO, "total_episodes": 15360, "prompts_per_step": 32, "group_size": 8, "ppo_epochs": 2,
        "learning_rate": 2e-3, "kl_coef": 0.01, "save_every": 20}


def compute_advantages(rewards, group_size, scale_rewards=True, eps=1e-4):
    """Group-relative advantages, rewards flat and prompt-major (group after group), shape (N,) -> (N,).

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      (Dr. GRPO: A_i = r_i - mean(r_group))

    std is the unbiased sample std of the group, as in trl. A group whose rewards are all equal gets 0.
    """
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def whiten(values, eps=1e-8):
    return (values - values.mean()) / (values.std() + eps)


def compute_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps, kl_coef, loss_type, normalizer,
                 is_weights=1.0):
    """Clipped surrogate + k3 KL penalty, per token (all (b, T) but advantages (b,)):

        rho_t = exp(logp_t - logp_old_t)
        L_t   = -w_t min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
        w_t   = the importance weight trainer/sampler of token t (nanorlhf.logprobs.importance_weights)

    loss_type "sequence": mean of L_t over each completion, summed over completions / normalizer (the number
    of completions in the whole batch); "token": L_t summed over all tokens / normalizer (all tokens).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]  # (b, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv) * is_weights
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
    mask = mask.float()
    if loss_type == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normalizer
    else:
        loss = (per_token * mask).sum() / normalizer
    tokens = mask.sum().clamp(min=1)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    stats = {"clip_fraction": ((clipped * mask).sum() / tokens).item()}
    if ref_logprobs is not None:
        stats["kl"] = ((kl * mask).sum() / tokens).item()
    return loss, stats


def main(cfg, algo="grpo"):
    from nanorlhf.run import Run

    if cfg.group_size < 2:
        raise UserError("--group_size must be at least 2: GRPO's baseline is the mean of the group's rewards")
    if cfg.loss_type not in ("sequence", "token"):
        raise UserError(f"--loss_type must be sequence or token, got {cfg.loss_type!r}")
    run = Run(cfg, algo)
    for step in run.steps():
        # 1. take the next prompts
        prompts = run.prompts.next(cfg.prompts_per_step)
        # 2. generate G completions per prompt, with this step's seed
        completions = run.generate(prompts, n=cfg.group_size, seed=cfg.seed + step)
        # 3. score them
        rewards, reward_parts = run.score(prompts, completions)  # (N,)
        # 4. advantages; sparse GRPO drops the completions that carry no policy gradient
        advantages = compute_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        if cfg.whiten_advantages:
            advantages = whiten(advantages)
        keep = advantages != 0 if cfg.sparse else None
        batch = run.batch(prompts, completions, keep=keep, advantages=advantages)
        # 5. reference log-probs (adapter off); the policy's come inside the update
        batch.ref_logprobs = run.reference_logprobs(batch) if cfg.kl_coef > 0 and len(batch) else None
        # 6. loss, backward, optimizer step
        normalizer = len(batch) if cfg.loss_type == "sequence" else sum(map(len, batch.completion_ids))
        stats = run.update(batch, epochs=cfg.ppo_epochs, loss_fn=lambda logprobs, entropy, mb: compute_loss(
            logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages,
            mb.completion_mask, cfg.clip_eps, cfg.kl_coef, cfg.loss_type, normalizer, is_weights=mb.is_weights))
        # 7. push the updated weights into the engine, in place
        run.sync()
        # 8. log
        run.log(step, rewards, completions, kept_fraction=len(batch) / len(completions), **stats,
                **{f"reward_{name}": values.mean().item() for name, values in reward_parts.items()})


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config, demo=DEMO))

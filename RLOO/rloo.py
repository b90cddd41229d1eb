"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

Each step samples `group_size` completions for each of `prompts_per_step` prompts from a persistent
vLLM engine, scores them, and uses as the baseline of each completion the mean reward of the OTHER
completions of the same prompt: an unbiased baseline with no value model. The policy is the base model
plus a LoRA adapter; the reference policy for the KL term is the same base with the adapter disabled.
After the optimizer step the updated weights are pushed into the engine in place (`--weight_sync`).

Differences from the paper: the paper subtracts a sequence-level KL penalty from the reward; here the
KL to the reference is the k3 estimator added to the loss, as in GRPO/grpo.py, so that the advantage is
the leave-one-out reward difference alone. The loss is the REINFORCE policy gradient written as the
clipped-ratio surrogate: with the default ppo_epochs=1 the ratio is 1 and it is exactly
-A log pi (the paper's estimator); with ppo_epochs > 1 the clip keeps later epochs near the sampler.
`sparse` (on by default) drops completions whose advantage is exactly zero (every group where all
completions got the same reward) before any log-prob work: their policy-gradient term is zero.

Run:  python RLOO/rloo.py --demo                 (CPU, tiny model, synthetic addition task, minutes)
      python RLOO/rloo.py                        (the defaults below, on one GPU)
      python RLOO/rloo.py --help                 (every field; --<field> <value> overrides it)
"""

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `cd RLOO && python rloo.py`
from nanorlhf import distributed, tasks  # noqa: E402
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
    output_dir: str = ""  # "" = runs/rloo-<date>-<time>
    overwrite: bool = False  # replace a run already in output_dir
    resume: str = ""  # run folder or checkpoint folder to continue from
    seed: int = 42  # step s samples with seed + s: new samples every step, the same ones on a rerun
    total_episodes: int = 20000  # completions generated over the whole run
    prompts_per_step: int = 16  # prompts per step
    group_size: int = 4  # completions per prompt (k); episodes per step = prompts_per_step x group_size
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
    learning_rate: float = 1e-3  # peak learning rate, cosine decay to 10% of it (README, "A real model on a laptop")
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_tokens: int = 8192  # token budget of one micro-batch with gradients (rows x longest; short sequences share a row)
    ppo_epochs: int = 1  # optimizer steps on each batch of rollouts
    # RLOO
    kl_coef: float = 0.01  # beta: weight of the k3 KL penalty in the loss (0 skips the reference pass)
    clip_eps: float = 0.2  # epsilon of the clipped ratio (only matters when ppo_epochs > 1)
    whiten_advantages: bool = False  # off: the leave-one-out mean is already the baseline
    sparse: bool = True  # drop completions whose advantage is 0 before any log-prob or backward work
    loss_type: str = "sequence"  # "sequence": mean over each completion's tokens, then over completions; "token"


# --demo: the shared demo defaults (tiny model, addition, exact-answer reward; see nanorlhf/tasks.py) plus these.
DEMO = {**tasks.DEMO, "total_episodes": 15360, "prompts_per_step": 32, "group_size": 8, "ppo_epochs": 2,
        "learning_rate": 2e-3, "kl_coef": 0.01, "save_every": 20}


def compute_advantages(rewards, group_size):
    """Leave-one-out advantages, rewards flat and prompt-major (group after group), shape (N,) -> (N,).

        A_i = r_i - 1/(k-1) sum_{j != i} r_j  =  k/(k-1) (r_i - mean(r_group))

    A group whose rewards are all equal gets 0.
    """
    grouped = rewards.view(-1, group_size)  # (prompts, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).flatten()


def whiten(values, eps=1e-8):
    return (values - values.mean()) / (values.std() + eps)


def compute_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps, kl_coef, loss_type, normalizer,
                 is_weights=1.0):
    """REINFORCE as a clipped surrogate + k3 KL penalty, per token (all (b, T) but advantages (b,)):

        rho_t = exp(logp_t - logp_old_t)                        (1 in the first epoch: the gradient is -A grad logp_t)
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


def main(cfg):
    from nanorlhf.run import Run

    if cfg.group_size < 2:
        raise UserError("--group_size must be at least 2: RLOO's baseline is the mean of the other completions")
    if cfg.loss_type not in ("sequence", "token"):
        raise UserError(f"--loss_type must be sequence or token, got {cfg.loss_type!r}")
    run = Run(cfg, algo="rloo")
    for step in run.steps():
        # 1. take the next prompts
        prompts = run.prompts.next(cfg.prompts_per_step)
        # 2. generate k completions per prompt, with this step's seed
        completions = run.generate(prompts, n=cfg.group_size, seed=cfg.seed + step)
        # 3. score them
        rewards, reward_parts = run.score(prompts, completions)  # (N,)
        # 4. leave-one-out advantages; sparse drops the completions that carry no policy gradient
        advantages = compute_advantages(rewards, cfg.group_size)
        if cfg.whiten_advantages:
            advantages = distributed.on_whole_batch(whiten, advantages)  # every rank's, under torchrun
        keep = advantages != 0 if cfg.sparse else None
        batch = run.batch(prompts, completions, keep=keep, advantages=advantages)
        # 5. reference log-probs (adapter off); the policy's come inside the update
        batch.ref_logprobs = run.reference_logprobs(batch) if cfg.kl_coef > 0 and len(batch) else None
        # 6. loss, backward, optimizer step
        normalizer = distributed.total(len(batch) if cfg.loss_type == "sequence" else  # over every rank (torchrun)
                                       int(batch.loss_mask.sum()))  # the tokens the model sampled
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

"""REINFORCE with a KL-penalised reward and batch whitening (Williams 1992; as used for RLHF in
Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, and REINFORCE++, https://arxiv.org/abs/2501.03262).

Each step samples `group_size` completions for each of `prompts_per_step` prompts from a persistent
vLLM engine and scores them. Each completion's reward is penalised by its own KL to the reference policy
(the sum over its sampled tokens of log pi - log pi_ref, times kl_coef), and the penalised rewards are
whitened over the whole batch (zero mean, unit std): the batch mean is the only baseline, as REINFORCE
has none of its own. No value model, no groups needed (group_size 1 is the default). The policy is the
base model plus a LoRA adapter; the reference policy is the same base with the adapter disabled. After
the optimizer step the updated weights are pushed into the engine in place (`--weight_sync`).

Differences from vanilla REINFORCE: whitening (on by default, `whiten_advantages`) subtracts the batch
mean, which is a baseline; with it off the advantage is the raw penalised reward. The loss is the policy
gradient written as the clipped-ratio surrogate: with the default ppo_epochs=1 the ratio is 1 and it is
exactly -A log pi; with ppo_epochs > 1 the clip keeps later epochs near the sampler. The KL penalty needs
the policy's log-probs before the update, so this script runs one extra no-grad pass over the batch.
`baseline="group"` is REINFORCE++-baseline (the paper's variant for several completions per prompt, as
OpenRLHF runs it): each reward minus its group's mean, then the KL penalty, then the batch whitening.

Run:  python Reinforce/reinforce.py --demo                 (CPU, tiny model, synthetic addition task, minutes)
      python Reinforce/reinforce.py                        (the defaults below, on one GPU)
      python Reinforce/reinforce.py --help                 (every field; --<field> <value> overrides it)
"""

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `cd Reinforce && python reinforce.py`
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
    output_dir: str = ""  # "" = runs/reinforce-<date>-<time>
    overwrite: bool = False  # replace a run already in output_dir
    resume: str = ""  # run folder or checkpoint folder to continue from
    seed: int = 42  # step s samples with seed + s: new samples every step, the same ones on a rerun
    total_episodes: int = 20000  # completions generated over the whole run
    prompts_per_step: int = 64  # prompts per step
    group_size: int = 1  # completions per prompt; episodes per step = prompts_per_step x group_size
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
    # REINFORCE
    kl_coef: float = 0.01  # beta: KL penalty subtracted from each reward (0 skips the reference and policy passes)
    clip_eps: float = 0.2  # epsilon of the clipped ratio (only matters when ppo_epochs > 1)
    baseline: str = "batch"  # "batch": the whitening's batch mean only; "group": REINFORCE++-baseline, group mean first
    whiten_advantages: bool = True  # on: whitening over the batch is REINFORCE's only baseline
    loss_type: str = "sequence"  # "sequence": mean over each completion's tokens, then over completions; "token"


# --demo: the shared demo defaults (tiny model, addition, exact-answer reward; see nanorlhf/tasks.py) plus these.
DEMO = {**tasks.DEMO, "total_episodes": 15360, "prompts_per_step": 32, "group_size": 8, "ppo_epochs": 2,
        "learning_rate": 2e-3, "kl_coef": 0.01, "save_every": 20}


def sequence_kl(logprobs, ref_logprobs):
    """Per-completion KL estimate, (N, C) -> (N,), both zero on padding (as Run returns them):

        KL_i = sum_t (logp_(i,t) - ref_(i,t))     over the sampled tokens t of completion i

    The reward is penalised with it: r'_i = r_i - beta KL_i.
    """
    return (logprobs - ref_logprobs).sum(1)


def group_centred(rewards, group_size):
    """REINFORCE++-baseline's first step, rewards flat and prompt-major (N,) -> (N,): r_i - mean(r_group(i)).
    The advantage is then compute_advantages(r_i - mean(r_group(i)) - beta KL_i), whitened over the batch."""
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    return (grouped - grouped.mean(dim=1, keepdim=True)).flatten()


def compute_advantages(rewards, whiten=True, eps=1e-8):
    """Advantages of the (penalised) rewards (N,) -> (N,): whitened over the whole batch,

        A_i = (r_i - mean(r)) / (std(r) + eps)         (whiten=False: A_i = r_i)

    std is the unbiased sample std. A batch whose rewards are all equal gets 0.
    """
    if not whiten:
        return rewards
    return (rewards - rewards.mean()) / (rewards.std() + eps)


def compute_loss(logprobs, old_logprobs, advantages, mask, clip_eps, loss_type, normalizer, is_weights=1.0):
    """REINFORCE as a clipped surrogate, per token (all (b, T) but advantages (b,)); the KL is in the reward:

        rho_t = exp(logp_t - logp_old_t)                        (1 in the first epoch: the gradient is -A grad logp_t)
        L_t   = -w_t min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)
        w_t   = the importance weight trainer/sampler of token t (nanorlhf.logprobs.importance_weights)

    loss_type "sequence": mean of L_t over each completion, summed over completions / normalizer (the number
    of completions in the whole batch); "token": L_t summed over all tokens / normalizer (all tokens).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]  # (b, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv) * is_weights
    mask = mask.float()
    if loss_type == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normalizer
    else:
        loss = (per_token * mask).sum() / normalizer
    tokens = mask.sum().clamp(min=1)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, {"clip_fraction": ((clipped * mask).sum() / tokens).item()}


def main(cfg):
    from nanorlhf.run import Run

    if cfg.loss_type not in ("sequence", "token"):
        raise UserError(f"--loss_type must be sequence or token, got {cfg.loss_type!r}")
    if cfg.baseline not in ("batch", "group"):
        raise UserError(f"--baseline must be batch or group, got {cfg.baseline!r}")
    if cfg.baseline == "group" and cfg.group_size < 2:
        raise UserError("--baseline group needs --group_size of at least 2: the baseline is the group's mean reward")
    if cfg.whiten_advantages and cfg.prompts_per_step * cfg.group_size < 2:
        raise UserError("--whiten_advantages needs at least 2 completions per step: raise --prompts_per_step")
    run = Run(cfg, algo="reinforce")
    for step in run.steps():
        # 1. take the next prompts
        prompts = run.prompts.next(cfg.prompts_per_step)
        # 2. generate G completions per prompt, with this step's seed
        completions = run.generate(prompts, n=cfg.group_size, seed=cfg.seed + step)
        # 3. score them
        rewards, reward_parts = run.score(prompts, completions)  # (N,)
        # 4. the batch: every completion (its advantage needs the log-probs of step 5)
        batch = run.batch(prompts, completions)
        # 5. reference (adapter off) and policy log-probs, no grad -> KL-penalised rewards -> whitened advantages
        # (REINFORCE++-baseline: the group's mean reward subtracted before the penalty)
        kl = torch.zeros(len(batch))  # (N,)
        if cfg.kl_coef > 0:
            kl = sequence_kl(run.policy_logprobs(batch), run.reference_logprobs(batch)).cpu()
        penalized_rewards = rewards - cfg.kl_coef * kl
        centred = group_centred(rewards, cfg.group_size) if cfg.baseline == "group" else rewards
        batch.advantages = distributed.on_whole_batch(  # whitened over every rank's completions (torchrun)
            lambda r: compute_advantages(r, cfg.whiten_advantages), centred - cfg.kl_coef * kl)
        # 6. loss, backward, optimizer step
        normalizer = distributed.total(len(batch) if cfg.loss_type == "sequence" else  # over every rank (torchrun)
                                       int(batch.loss_mask.sum()))  # the tokens the model sampled
        stats = run.update(batch, epochs=cfg.ppo_epochs, loss_fn=lambda logprobs, entropy, mb: compute_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.completion_mask, cfg.clip_eps, cfg.loss_type, normalizer,
            is_weights=mb.is_weights))
        # 7. push the updated weights into the engine, in place
        run.sync()
        # 8. log
        if cfg.kl_coef > 0:  # kl: the mean per-token log(pi / pi_ref) of the sampled tokens (the penalty's estimator)
            stats["kl"] = distributed.total(kl.sum().item()) / distributed.total(sum(map(len, batch.completion_ids)))
        run.log(step, rewards, completions, reward_penalized_mean=penalized_rewards.mean().item(), **stats,
                **{f"reward_{name}": values.mean().item() for name, values in reward_parts.items()})


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config, demo=DEMO))

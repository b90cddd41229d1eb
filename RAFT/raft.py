"""RAFT: Reward rAnked FineTuning (Dong et al. 2023, https://arxiv.org/abs/2304.06767).

Each step samples `group_size` (K) completions for each of `prompts_per_step` prompts from a persistent
vLLM engine, scores them, keeps the best completion of each prompt, and fine-tunes the policy on the
kept completions with the plain supervised loss (negative log-likelihood): no advantage, no ratio, no
value model. The policy is the base model plus a LoRA adapter; after the optimizer step the updated weights are
pushed into the engine in place (`--weight_sync`).

Differences from the paper: the paper collects a large batch of best-of-K samples and then fine-tunes on
it for several epochs before sampling again; here each step's kept samples get `ppo_epochs` optimizer
steps (the shared name for "optimizer steps on each batch") and the next step samples from the updated
policy, like every other script in this repository. `reward_threshold` additionally drops a prompt's best
completion when its reward is not above the threshold (with a 0/1 reward, threshold 0 keeps only the
right answers, i.e. rejection-sampling fine-tuning). The paper uses no KL term; `kl_coef` > 0 adds the
same k3 penalty to the reference (the base model, adapter off) as GRPO/grpo.py.

Run:  python RAFT/raft.py --demo                 (CPU, tiny model, synthetic addition task, minutes)
      python RAFT/raft.py                        (the defaults below, on one GPU)
      python RAFT/raft.py --help                 (every field; --<field> <value> overrides it)
"""

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `cd RAFT && python raft.py`
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
    output_dir: str = ""  # "" = runs/raft-<date>-<time>
    overwrite: bool = False  # replace a run already in output_dir
    resume: str = ""  # run folder or checkpoint folder to continue from
    seed: int = 42  # step s samples with seed + s: new samples every step, the same ones on a rerun
    total_episodes: int = 20000  # completions generated over the whole run
    prompts_per_step: int = 16  # prompts per step
    group_size: int = 4  # completions per prompt (K), the best one is kept; episodes per step = prompts_per_step x K
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
    # RAFT
    kl_coef: float = 0.0  # beta: weight of a k3 KL penalty in the loss (0, the paper: no reference pass)
    reward_threshold: float | None = None  # keep a prompt's best completion only if its reward is above this


# --demo: the shared demo defaults (tiny model, addition, exact-answer reward; see nanorlhf/tasks.py) plus these.
DEMO = {**tasks.DEMO, "total_episodes": 15360, "prompts_per_step": 32, "group_size": 8, "ppo_epochs": 2,
        "learning_rate": 1e-3, "reward_threshold": 0.0, "save_every": 20}


def select_best(rewards, group_size, threshold=None):
    """Indices into the flat, prompt-major rewards (N,) of each prompt's best completion -> (kept,).

        best(p) = argmax_i r_(p, i)     (ties: the first), kept only if r_best > threshold (when given)
    """
    grouped = rewards.view(-1, group_size)  # (prompts, K)
    best_reward, best = grouped.max(dim=1)  # max returns the first index of a tie
    index = torch.arange(len(grouped)) * group_size + best
    if threshold is not None:
        index = index[best_reward > threshold]
    return index


def compute_loss(logprobs, ref_logprobs, mask, kl_coef, normalizer, is_weights=1.0):
    """Negative log-likelihood of the kept completions + optional k3 KL penalty, per token ((b, T) each):

        L_t = -w_t logp_t + beta (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
        w_t = the importance weight trainer/sampler of token t (nanorlhf.logprobs.importance_weights)

    log-probs at temperature 1: supervised fine-tuning of the model itself on its best samples (the sampling
    temperature only shapes which samples there are).

    summed over all real tokens / normalizer (the number of kept tokens in the whole batch): the mean
    per-token NLL, as in supervised fine-tuning.
    """
    per_token = -logprobs * is_weights
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
    mask = mask.float()
    loss = (per_token * mask).sum() / normalizer
    tokens = mask.sum().clamp(min=1)
    stats = {"nll": (-(logprobs.detach() * mask).sum() / tokens).item()}
    if ref_logprobs is not None:
        stats["kl"] = ((kl * mask).sum() / tokens).item()
    return loss, stats


def main(cfg):
    from nanorlhf.run import Run

    if cfg.group_size < 2:
        raise UserError("--group_size must be at least 2: RAFT keeps the best of K completions per prompt")
    run = Run(cfg, algo="raft")
    for step in run.steps():
        # 1. take the next prompts
        prompts = run.prompts.next(cfg.prompts_per_step)
        # 2. generate K completions per prompt, with this step's seed
        completions = run.generate(prompts, n=cfg.group_size, seed=cfg.seed + step)
        # 3. score them
        rewards, reward_parts = run.score(prompts, completions)  # (N,)
        # 4. keep the best completion of each prompt (above the threshold, if one is set)
        keep = torch.zeros(len(completions), dtype=torch.bool)
        keep[select_best(rewards, cfg.group_size, cfg.reward_threshold)] = True
        batch = run.batch(prompts, completions, keep=keep)
        # 5. reference log-probs (adapter off); the policy's come inside the update
        batch.ref_logprobs = run.reference_logprobs(batch, temperature=1.0) if cfg.kl_coef > 0 and len(batch) else None
        # 6. loss, backward, optimizer step (at temperature 1: supervised learning, not the sampler's distribution)
        normalizer = distributed.total(int(batch.loss_mask.sum()))  # the model's tokens, over every rank (torchrun)
        stats = run.update(batch, epochs=cfg.ppo_epochs, temperature=1.0, loss_fn=lambda logprobs, entropy, mb:
                           compute_loss(logprobs, mb.ref_logprobs, mb.completion_mask, cfg.kl_coef, normalizer,
                                        is_weights=mb.is_weights))
        # 7. push the updated weights into the engine, in place
        run.sync()
        # 8. log
        run.log(step, rewards, completions, kept_fraction=len(batch) / len(completions),
                kept_reward_mean=distributed.gather(rewards[keep]).mean().item() if distributed.total(len(batch))
                else None, **stats,
                **{f"reward_{name}": values.mean().item() for name, values in reward_parts.items()})


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config, demo=DEMO))

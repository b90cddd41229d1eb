"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, https://arxiv.org/abs/2402.03300), and the
variants of 2025 as options: DAPO, Dr. GRPO, GSPO, CISPO.

Each step samples `group_size` completions for each of `prompts_per_step` prompts from a persistent
vLLM engine, scores them, and uses each completion's reward relative to its own group as the
advantage: no value model. The policy is the base model plus a LoRA adapter; the reference policy
for the KL term is the same base with the adapter disabled. After the optimizer step the updated
weights are pushed into the engine in place (`--weight_sync`).

Differences from the paper: the KL term uses the paper's k3 estimator, but with the default
ppo_epochs=1 the policy takes one optimizer step per batch of rollouts, so the probability ratio is 1
and the clip only matters when ppo_epochs > 1 (as in trl's default). `sparse` drops completions whose
advantage is exactly zero before any log-prob work: their policy-gradient term is zero and the loss is
still divided by the whole batch's count, so with kl_coef 0 it changes nothing but the time spent.

Variants (formulas in compute_loss, loss_normalizer, overlong_penalty and sample_groups):
- `loss_type`: "sequence" (the paper: mean over each completion's tokens), "token" (DAPO: mean over all
  tokens), "dr_grpo" (Dr. GRPO, https://arxiv.org/abs/2503.20783: token sum / (completions x max_new_tokens),
  no length bias; with scale_rewards=False, which alone is not Dr. GRPO), "cispo" (MiniMax-M1,
  https://arxiv.org/abs/2506.13585: a clipped, stop-gradient importance weight on the REINFORCE term).
- `clip_eps_low` / `clip_eps_high`: DAPO's clip-higher (https://arxiv.org/abs/2503.14476), 0.2 / 0.28.
- `dynamic_sampling`: DAPO's filter: groups whose rewards are all equal are dropped and new prompts are
  generated until the step has prompts_per_step informative groups (at most max_refill_rounds extra rounds).
- `mask_truncated_completions` (DAPO's overlong filtering) and `overlong_buffer` (DAPO's soft overlong
  punishment, logged as reward_overlong).
- `importance_sampling_level="sequence"`: GSPO (https://arxiv.org/abs/2507.18071), one length-normalised
  ratio per completion, clipped per completion.
- `recipe`: dapo, dr_grpo or gspo set the paper's fields at once (RECIPES below; explicit flags still win).

Run:  python GRPO/grpo.py --demo                 (CPU, tiny model, synthetic addition task, minutes)
      python GRPO/grpo.py --demo --recipe dapo   (the same with DAPO's settings)
      python GRPO/grpo.py                        (the defaults below, on one GPU)
      python GRPO/grpo.py --help                 (every field; --<field> <value> overrides it)
"""

import math
import os
import sys
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `cd GRPO && python grpo.py`
from nanorlhf import distributed, tasks  # noqa: E402
from nanorlhf.config import RunConfig, parse_config  # noqa: E402
from nanorlhf.errors import UserError, exit_on_user_error  # noqa: E402
from nanorlhf.rollout import model_tokens  # noqa: E402


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
    learning_rate: float = 1e-3  # peak learning rate, cosine decay to 10% of it (README, "A real model on a laptop")
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_tokens: int = 8192  # token budget of one micro-batch with gradients (rows x longest; short sequences share a row)
    ppo_epochs: int = 1  # optimizer steps on each batch of rollouts
    # GRPO
    recipe: str = ""  # a paper's settings at once: dapo, dr_grpo or gspo (see RECIPES; explicit flags still win)
    kl_coef: float = 0.01  # beta: weight of the KL penalty to the reference policy (0 skips the reference pass)
    clip_eps: float = 0.2  # epsilon of the clipped ratio, both sides: clip(rho, 1 - eps, 1 + eps)
    clip_eps_low: float | None = None  # lower epsilon, 1 - eps_low (None: clip_eps)
    clip_eps_high: float | None = None  # upper epsilon, 1 + eps_high (None: clip_eps; DAPO 0.28); cispo: weight cap
    scale_rewards: bool = True  # divide by the group's reward std (Dr. GRPO: false, and loss_type dr_grpo)
    whiten_advantages: bool = False  # off: the group mean is already the baseline
    sparse: bool = False  # drop completions whose advantage is 0 before any log-prob or backward work: saves time
    loss_type: str = "sequence"  # "sequence": mean per completion, then over them; "token" (DAPO), "dr_grpo", "cispo"
    importance_sampling_level: str = "token"  # "token": a ratio per token; "sequence": GSPO's one per completion
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill with new prompts
    max_refill_rounds: int = 3  # dynamic sampling: at most this many extra generation rounds per step
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens get no loss (DAPO: overlong filtering)
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last N tokens before max_new_tokens (0: off)
    overlong_penalty: float = 1.0  # reward subtracted at max_new_tokens; ramps up linearly over overlong_buffer


# --demo: the shared demo defaults (tiny model, addition, exact-answer reward; see nanorlhf/tasks.py) plus these.
DEMO = {**tasks.DEMO, "total_episodes": 15360, "prompts_per_step": 32, "group_size": 8, "ppo_epochs": 2,
        "learning_rate": 2e-3, "kl_coef": 0.01, "save_every": 20}

# --recipe: the fields a paper sets, over the defaults and the demo's; any field named on the command line still wins.
RECIPES = {
    # DAPO (arXiv 2503.14476): clip-higher, token-level loss, dynamic sampling, soft overlong punishment over the last
    # fifth of the tokens (4096 of 20480 in the paper), no KL term
    "dapo": {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "loss_type": "token", "dynamic_sampling": True,
             "overlong_buffer": lambda cfg: cfg.max_new_tokens // 5, "overlong_penalty": 1.0, "kl_coef": 0.0},
    # Dr. GRPO (arXiv 2503.20783): no std scaling and a constant normaliser instead of each completion's length
    "dr_grpo": {"scale_rewards": False, "loss_type": "dr_grpo"},
    # GSPO (arXiv 2507.18071): sequence-level, length-normalised ratio, clipped at 3e-4 / 4e-4, sequence mean
    "gspo": {"importance_sampling_level": "sequence", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4,
             "loss_type": "sequence"},
}


def compute_advantages(rewards, group_size, scale_rewards=True, eps=1e-4):
    """Group-relative advantages, rewards flat and prompt-major (group after group), shape (N,) -> (N,).

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      (scale_rewards=False: A_i = r_i - mean(r_group))

    std is the unbiased sample std of the group, as in trl. A group whose rewards are all equal gets 0. Dr. GRPO is
    scale_rewards=False together with loss_type "dr_grpo" (--recipe dr_grpo): the length bias is in the loss.
    """
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def whiten(values, eps=1e-8):
    return (values - values.mean()) / (values.std() + eps)


def loss_normalizer(loss_type, lengths, max_new_tokens):
    """The divisor of the step's summed loss, from the lengths (N,) of every completion that carries a loss, including
    those sparse drops (their terms are zero, the divisor stays: sparse changes the time spent, not the gradient):

        sequence: N               token, cispo: sum_i |o_i|               dr_grpo: N x max_new_tokens
    """
    if loss_type == "sequence":
        return max(len(lengths), 1)
    if loss_type == "dr_grpo":
        return max(len(lengths), 1) * max_new_tokens
    return max(int(lengths.sum()), 1)


def select_completions(advantages, lengths, truncated, cfg):
    """Which completions the update sees ((N,) bool) and the loss normaliser. mask_truncated_completions: truncated
    ones get no loss and do not count in the normaliser; sparse: zero-advantage ones are skipped too but still
    counted, so that (with kl_coef 0) sparse changes the time spent and nothing else."""
    trained = ~truncated if cfg.mask_truncated_completions else torch.ones_like(truncated)
    # the whole batch's normaliser: under torchrun every rank's lengths (nanorlhf/distributed.py)
    normalizer = loss_normalizer(cfg.loss_type, distributed.gather(lengths[trained]), cfg.max_new_tokens)
    keep = trained & (advantages != 0) if cfg.sparse else trained
    return keep, normalizer


def compute_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps, kl_coef, loss_type, normalizer,
                 is_weights=1.0, importance_sampling_level="token"):
    """Clipped surrogate + k3 KL per token (all (b, T) but advantages (b,)); clip_eps: eps or (eps_low, eps_high)

        rho_t = exp(logp_t - logp_old_t)                         (importance_sampling_level "token")
        rho_t = s_i = exp(1/|o_i| sum_t (logp_t - logp_old_t))   ("sequence", GSPO: one ratio per completion i)
        L_t   = -w_t min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t
        L_t   = -w_t sg(min(rho_t, 1 + eps_high)) A logp_t + beta k3_t     (loss_type "cispo", MiniMax-M1: the weight
                                                   is clipped, not the update, so no token loses its gradient)
        k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
        w_t   = the importance weight trainer/sampler of token t (nanorlhf.logprobs.importance_weights)

    loss_type "sequence": mean of L_t over each completion, summed over completions / normalizer; "token",
    "dr_grpo", "cispo": L_t summed over all tokens / normalizer (see loss_normalizer). trl's cispo cap
    epsilon_high=5 is clip_eps_high=4 here.
    """
    eps_low, eps_high = clip_eps if isinstance(clip_eps, tuple) else (clip_eps, clip_eps)
    mask = mask.float()
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # (b, 1)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # (b, 1)
    if loss_type == "cispo":
        per_token = -ratio.clamp(max=1 + eps_high).detach() * adv * logprobs * is_weights
        clipped = ratio > 1 + eps_high
    else:
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv) * is_weights
        clipped = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
    if loss_type == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normalizer
    else:
        loss = (per_token * mask).sum() / normalizer
    tokens = mask.sum().clamp(min=1)
    stats = {"clip_fraction": ((clipped.float() * mask).sum() / tokens).item()}
    if ref_logprobs is not None:
        stats["kl"] = ((kl * mask).sum() / tokens).item()
    return loss, stats


def overlong_penalty(lengths, max_new_tokens, buffer, penalty):
    """DAPO's soft overlong punishment (eq. 13), completion lengths (N,) -> reward added (N,), L = max_new_tokens:

        0                                       |o| <= L - buffer
        -penalty (|o| - (L - buffer)) / buffer  L - buffer < |o| <= L     (-penalty at L)
    """
    return -penalty * ((lengths - (max_new_tokens - buffer)) / buffer).clamp(0, 1)


def informative_groups(rewards, group_size):
    """(N,) rewards, prompt-major -> (N / group_size,) bool: True where the group's rewards are not all equal."""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(1)


def generation_seed(seed, step, refill_round):
    """Step s samples with seed + s; dynamic sampling's refill round k with seed + s + k x 10^6 (distinct from every
    step's own seed, and the same on a rerun)."""
    return seed + step + refill_round * 1_000_000


def sample_groups(run, cfg, step):
    """Steps 1-3: prompts -> group_size completions each -> rewards (plus the overlong shaping). With dynamic sampling
    (DAPO) a group whose rewards are all equal is dropped (zero advantage: no gradient) and refill rounds generate
    more prompts, the missing number divided by the share of informative groups seen so far this step (at most
    prompts_per_step), until prompts_per_step informative groups are found or max_refill_rounds rounds are spent.

    Returns the training groups (prompts, completions, rewards), everything generated (completions, rewards,
    reward parts: what the step logs, an unbiased sample of the policy) and the number of refill rounds.
    Under torchrun each rank generates its share of each round, and the counts (kept, seen) are the whole step's."""
    G, wanted = cfg.group_size, cfg.prompts_per_step
    prompts, completions, rewards = [], [], []  # the training groups (this rank's)
    seen_completions, seen_rewards, seen_parts = [], [], []
    n_prompts, seen_groups, kept = wanted, 0, 0
    for refill_round in range(1 + (cfg.max_refill_rounds if cfg.dynamic_sampling else 0)):
        new_prompts = run.prompts.next(n_prompts)
        new = run.generate(new_prompts, n=G, seed=generation_seed(cfg.seed, step, refill_round))
        new_rewards, parts = run.score(new_prompts, new)  # (n_prompts x G,)
        if cfg.overlong_buffer > 0:
            lengths = torch.tensor([len(c.token_ids) for c in new], dtype=torch.float)
            parts["overlong"] = overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
            new_rewards = new_rewards + parts["overlong"]
        seen_completions += new
        seen_rewards.append(new_rewards)
        seen_parts.append(parts)
        groups = range(len(new_prompts))
        if cfg.dynamic_sampling:  # the round's first informative groups, counted over every rank's share
            chosen = distributed.gather(informative_groups(new_rewards, G)).nonzero().flatten().tolist()
            chosen, (first, _) = chosen[: wanted - kept], distributed.shard(n_prompts)
            groups = [g - first for g in chosen if first <= g < first + len(new_prompts)]
        kept += len(chosen) if cfg.dynamic_sampling else n_prompts
        for g in groups:
            completions += [replace(c, prompt_index=len(prompts)) for c in new[g * G : (g + 1) * G]]
            rewards.append(new_rewards[g * G : (g + 1) * G])
            prompts.append(new_prompts[g])
        seen_groups += n_prompts
        missing = wanted - kept
        if missing == 0:
            break
        n_prompts = min(wanted, math.ceil(missing * seen_groups / max(kept, 1)))
    seen_parts = {name: torch.cat([p[name] for p in seen_parts]) for name in seen_parts[0]}
    rewards = torch.cat(rewards) if rewards else torch.zeros(0)
    return prompts, completions, rewards, (seen_completions, torch.cat(seen_rewards), seen_parts), refill_round


def apply_recipe(cfg):
    """Set the fields of cfg.recipe the user did not name on the command line (defaults < --demo < recipe < flags)."""
    if not cfg.recipe:
        return cfg
    if cfg.recipe not in RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    for name, value in RECIPES[cfg.recipe].items():
        if name not in getattr(cfg, "explicit", set()):
            setattr(cfg, name, value(cfg) if callable(value) else value)
    return cfg


def check(cfg):
    if cfg.group_size < 2:
        raise UserError("--group_size must be at least 2: GRPO's baseline is the mean of the group's rewards")
    if cfg.loss_type not in ("sequence", "token", "dr_grpo", "cispo"):
        raise UserError(f"--loss_type must be sequence, token, dr_grpo or cispo, got {cfg.loss_type!r}")
    if cfg.importance_sampling_level not in ("token", "sequence"):
        raise UserError(f"--importance_sampling_level must be token or sequence, got {cfg.importance_sampling_level!r}")
    if not 0 <= cfg.overlong_buffer <= cfg.max_new_tokens:
        raise UserError(f"--overlong_buffer must be between 0 (off) and max_new_tokens ({cfg.max_new_tokens}), "
                        f"got {cfg.overlong_buffer}")
    if cfg.max_refill_rounds < 0:
        raise UserError(f"--max_refill_rounds must be at least 0, got {cfg.max_refill_rounds}")


def main(cfg, algo="grpo"):
    from nanorlhf.run import Run

    check(apply_recipe(cfg))
    clip_eps = (cfg.clip_eps if cfg.clip_eps_low is None else cfg.clip_eps_low,
                cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high)
    run = Run(cfg, algo)
    for step in run.steps():
        # 1.-3. take the next prompts, generate G completions each with this step's seed, score them
        # (dynamic sampling: only groups whose rewards differ, refilled with more prompts)
        prompts, completions, rewards, generated, refill_rounds = sample_groups(run, cfg, step)
        # 4. advantages; the completions that carry a loss (sparse GRPO skips those with no policy gradient)
        advantages = compute_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        if cfg.whiten_advantages:  # over the whole batch (every rank's, under torchrun)
            advantages = distributed.on_whole_batch(whiten, advantages)
        lengths = torch.tensor([model_tokens(c) for c in completions])  # tool tokens (multi-turn) carry no loss
        truncated = torch.tensor([c.truncated for c in completions], dtype=torch.bool)
        keep, normalizer = select_completions(advantages, lengths, truncated, cfg)
        batch = run.batch(prompts, completions, keep=keep, advantages=advantages)
        # 5. reference log-probs (adapter off); the policy's come inside the update
        batch.ref_logprobs = run.reference_logprobs(batch) if cfg.kl_coef > 0 and len(batch) else None
        # 6. loss, backward, optimizer step
        stats = run.update(batch, epochs=cfg.ppo_epochs, loss_fn=lambda logprobs, entropy, mb: compute_loss(
            logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.completion_mask, clip_eps, cfg.kl_coef,
            cfg.loss_type, normalizer, mb.is_weights, cfg.importance_sampling_level))
        # 7. push the updated weights into the engine, in place
        run.sync()
        # 8. log (rewards and lengths of everything generated this step, dropped groups included)
        all_completions, all_rewards, all_parts = generated
        informative = distributed.total(informative_groups(rewards, cfg.group_size).sum().item())
        kept_fraction = distributed.total(len(batch)) / max(distributed.total(len(completions)), 1)
        run.log(step, all_rewards, all_completions, kept_fraction=kept_fraction,
                refill_rounds=refill_rounds, informative_groups=informative, **stats,
                **{f"reward_{name}": distributed.gather(values).mean().item() for name, values in all_parts.items()})


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config, demo=DEMO))

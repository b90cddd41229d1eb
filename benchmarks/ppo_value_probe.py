"""Why PPO's value initialisation fits or not: the critic's value head alone, fitted on frozen features of real
rollouts, under each head initialisation, target scaling and learning rate (issue 30).

How: PPO/ppo.py's model, data and reward (every --field value pair is passed to its Config) generate `--batches`
batches of the initial policy's rollouts with the value initialisation's seeds (seed - 1, seed - 2, ...), score them,
and keep the critic's last hidden state at every completion token (the fresh critic adapter changes nothing yet, so
these are the base model's). Then, for every variant, the value head alone is fitted as the value initialisation
fits the whole critic: round k measures explained variance on batch k before fitting it (held-back data), then takes
`ppo_epochs` full-batch AdamW steps on it. The adapter is left out: its passes cost seconds, the head's microseconds,
so every variant sees the same data. A ridge probe fitted on all batches but the last, scored on the last, says how
much of the return a linear head on these features can explain at all.

Variants: head init `default` (PyTorch's Linear init, what the critic had) or `zero` (weights 0, V = the shift);
targets `raw` or `normalised` (V = mean + std * head(h), mean and std of the first batch's returns); learning rates.

Command (results: benchmarks/results/ppo_value_probe_smollm2.json):
  python benchmarks/ppo_value_probe.py --json benchmarks/results/ppo_value_probe_smollm2.json \\
      --model smollm2-135m-instruct --weight_sync merged --dataset /tmp/ppo_if/train.jsonl --prompt_field prompt \\
      --reward_fn examples/instruction-following/reward.py:constraints --max_prompt_tokens 256 \\
      --prompts_per_step 4 --group_size 4 --max_new_tokens 48 --wandb false --output_dir /tmp/ppo_probe --overwrite
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from nanorlhf.config import load_module, parse_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collect(cfg, batches):
    """[(features (N, H), returns (N,), prompt index (N,))] per batch: every completion token of the batch."""
    from nanorlhf.critic import Critic
    from nanorlhf.logprobs import completion_states
    from nanorlhf.policy import evaluating
    from nanorlhf.run import Run

    ppo = load_module(os.path.join(ROOT, "PPO", "ppo.py"))
    run = Run(cfg, algo="ppo")
    critic = Critic(run.policy, run.tokenizer.pad_token_id, cfg.value_learning_rate, cfg.max_grad_norm, run.packed)
    out = []
    for k in range(1, batches + 1):
        prompts = run.prompts.next(cfg.prompts_per_step)
        completions = run.generate(prompts, n=cfg.group_size, seed=cfg.seed - k)
        rewards, _ = run.score(prompts, completions)
        batch = run.batch(prompts, completions)
        mask = ppo.completion_mask(batch)
        _, returns = ppo.compute_gae(ppo.token_rewards(rewards, None, None, mask, 0.0), torch.zeros(mask.shape), mask,
                                     cfg.gamma, 1.0)
        features = []
        with critic.active(), evaluating(run.policy):
            for idx in run.micro_batches(batch, grad=False)[0]:
                mb = batch.select(idx, "cpu")
                hidden, _, mb_mask = completion_states(run.policy, mb.prompt_ids, mb.completion_ids, run.tokenizer.
                                                       pad_token_id, run.packed)
                features.append((idx, hidden.float().cpu(), mb_mask.cpu()))
        # back into batch order: token n of completion b
        rows = {}
        for idx, hidden, mb_mask in features:
            counts = mb_mask.sum(1).tolist()
            for b, chunk in zip(idx, hidden.split(counts)):
                rows[b] = chunk
        prompt_of = torch.cat([torch.full((int(mask[b].sum()),), b // cfg.group_size) for b in range(len(batch))])
        out.append((torch.cat([rows[b] for b in range(len(batch))]), returns[mask].float(), prompt_of))
        print(f"batch {k}: reward mean {rewards.mean():.3f}, std {rewards.std():.3f}, {mask.sum().item()} tokens",
              flush=True)
    run.close()
    return out


def explained_variance(values, returns):
    variance = returns.var()
    return (1 - (returns - values).var() / variance).item() if variance > 0 else float("nan")


def fit_head(data, init, targets, lr, epochs, seed=0):
    """Explained variance of round k on batch k before fitting it, as the value initialisation measures it."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(data[0][0].shape[1], 1)
    if init == "zero":
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    shift, scale = 0.0, 1.0
    if targets == "normalised":
        shift, scale = data[0][1].mean().item(), max(data[0][1].std().item(), 1e-6)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    trajectory = []
    for features, returns, _ in data:
        with torch.no_grad():
            trajectory.append(explained_variance(shift + scale * head(features).squeeze(-1), returns))
        for _ in range(epochs):
            loss = 0.5 * ((shift + scale * head(features).squeeze(-1) - returns) ** 2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    return trajectory


def ridge_probe(data, alpha):
    """A linear head fitted in closed form on every batch but the last; explained variance on the last."""
    x = torch.cat([d[0] for d in data[:-1]]).double()
    y = torch.cat([d[1] for d in data[:-1]]).double()
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    w = torch.linalg.solve(xc.T @ xc + alpha * len(x) * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - mean_y))
    test_x, test_y = data[-1][0].double(), data[-1][1].double()
    return explained_variance((test_x - mean_x) @ w + mean_y, test_y)


def prompt_share(data):
    """Share of each batch's return variance that lies between prompts (what a critic that knew each prompt's
    mean return, and nothing about the completion, would explain); mean over the batches."""
    shares = []
    for _, returns, prompt_of in data:
        means = torch.zeros(int(prompt_of.max()) + 1).index_add_(0, prompt_of, returns) / torch.bincount(prompt_of)
        if returns.var() > 0:
            shares.append(explained_variance(means[prompt_of], returns))
    return statistics.mean(shares) if shares else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=10, help="batches of rollouts (the last also scores the ridge probe)")
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="head learning rates, comma-separated")
    p.add_argument("--json", help="write the results here")
    args, extra = p.parse_known_args(argv)
    ppo = load_module(os.path.join(ROOT, "PPO", "ppo.py"))
    cfg = parse_config(ppo.Config, extra)
    data = collect(cfg, args.batches)
    norms = torch.cat([d[0] for d in data]).norm(dim=1)
    report = {"config": {k: v for k, v in vars(cfg).items() if k != "explicit"}, "batches": args.batches,
              "tokens_per_batch": [len(d[1]) for d in data],
              "return_mean": [d[1].mean().item() for d in data], "return_std": [d[1].std().item() for d in data],
              "feature_norm_mean": norms.mean().item(), "between_prompt_share": prompt_share(data),
              "ridge_ev_last_batch": {str(a): ridge_probe(data, a) for a in (1e-4, 1e-2, 1.0)}, "variants": {}}
    print(f"feature L2 norm {report['feature_norm_mean']:.1f}; between-prompt share of the return variance "
          f"{report['between_prompt_share']:.2f}; ridge probe EV on the last batch {report['ridge_ev_last_batch']}")
    for init in ("default", "zero"):
        for targets in ("raw", "normalised"):
            for lr in map(float, args.lrs.split(",")):
                trajectory = fit_head(data, init, targets, lr, cfg.ppo_epochs)
                name = f"{init}/{targets}/lr{lr:g}"
                report["variants"][name] = trajectory
                print(f"{name:28s} " + " ".join(f"{ev:7.2f}" for ev in trajectory), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Reward and tool calls per step of a run with tools, and the first vs last quarter of the steps.

    python examples/tools/plot.py runs/<run> [--out examples/tools/demo_curve.png]

Prints a table (mean of the first and the last quarter of the steps) and writes a plot (default <run>/tools.png):
reward_mean and tool_calls_mean per step, and eval_reward_correct (greedy, held out) where it was evaluated.
"""

import argparse
import json
import os

COLUMNS = ["reward_mean", "reward_used_calculator", "tool_calls_mean", "turns_mean", "tool_failures",
           "response_length_mean"]


def quarters(rows):
    """{metric: (first-quarter mean, last-quarter mean)} over the rows (one per step)."""
    k = max(len(rows) // 4, 1)
    mean = lambda part, key: sum(r[key] for r in part) / len(part)  # noqa: E731
    return {key: (mean(rows[:k], key), mean(rows[-k:], key)) for key in COLUMNS if key in rows[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (holds metrics.jsonl)")
    parser.add_argument("--out", default="", help="where to write the plot (default <run>/tools.png)")
    args = parser.parse_args()
    with open(os.path.join(args.run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    print(f"{len(rows)} steps, first vs last quarter ({max(len(rows) // 4, 1)} steps each):")
    for key, (first, last) in quarters(rows).items():
        print(f"  {key:24s} {first:8.3f} -> {last:8.3f}")
    evals = [(r["step"], r["eval_reward_correct"]) for r in rows if "eval_reward_correct" in r]
    if evals:
        print("  greedy held-out accuracy (eval_reward_correct): " + ", ".join(f"step {s}: {v:.2f}" for s, v in evals))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(steps, [r["reward_mean"] for r in rows], label="reward (sampled)")
    if evals:
        left.plot(*zip(*evals), "o-", label="greedy held-out accuracy")
    left.set(xlabel="step", ylabel="share of right answers", ylim=(0, 1))
    left.legend()
    right.plot(steps, [r["tool_calls_mean"] for r in rows], color="tab:green")
    right.set(xlabel="step", ylabel="tool calls per episode")
    fig.tight_layout()
    out = args.out or os.path.join(args.run, "tools.png")
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()

"""Several seeds of one GRPO configuration on this task, summarised: the reward curve, the greedy evaluation over the
run, the canary and the importance ratios, and the held-out accuracy before vs after (evaluate.py's JSON files).

    python examples/instruction-following/summarize.py --runs runs/if-s1,runs/if-s2,runs/if-s3 \\
        --before before.json --after after-s1.json,after-s2.json,after-s3.json --json summary.json --plot curve.png

Prints one line per seed and the mean and spread (min to max over seeds) of each number; the README quotes them.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanorlhf.tracking import new_figure, save_figure  # noqa: E402

def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def quarter_means(values):
    q = max(len(values) // 4, 1)
    return statistics.mean(values[:q]), statistics.mean(values[-q:])


def summarize_run(run, after_path):
    rows = read_metrics(run)
    first, last = quarter_means([r["reward_mean"] for r in rows])
    summary = {"run": os.path.basename(run.rstrip("/")), "steps": len(rows), "reward_first_quarter": first,
               "reward_last_quarter": last,
               "eval_curve": [(r["step"], r["eval_reward_mean"]) for r in rows if "eval_reward_mean" in r],
               "canary_max": max(r["logprob_diff"] for r in rows), "canary_min": min(r["logprob_diff"] for r in rows),
               "is_ratio_max": max(r["is_ratio_max"] for r in rows),
               "is_ratio_mean_range": (min(r["is_ratio_mean"] for r in rows), max(r["is_ratio_mean"] for r in rows)),
               "is_clipped_fraction_max": max(r["is_clipped_fraction"] for r in rows),
               "kl_last": rows[-1]["kl"], "seconds_per_step_median": statistics.median(r["time_step"] for r in rows),
               "truncated_first_last": quarter_means([r["truncated_fraction"] for r in rows])}
    if after_path:
        summary["after"] = accuracies(after_path)
    return summary, rows


def accuracies(path):
    """evaluate.py --out: constraints met (instruction-level, strict) per evaluation file."""
    with open(path) as f:
        return {name: r["constraints"] for name, r in json.load(f)["results"].items()}


def spread(values):
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def plot(runs, path):
    fig, axes = new_figure(1, 3, figsize=(15, 4))
    for i, (name, rows) in enumerate(runs):
        steps, color = [r["step"] for r in rows], f"C{i}"
        axes[0].plot(steps, [r["reward_mean"] for r in rows], color=color, alpha=0.7, label=name)
        evals = [(r["step"], r["eval_reward_mean"]) for r in rows if "eval_reward_mean" in r]
        axes[1].plot([s for s, _ in evals], [v for _, v in evals], color=color, marker="o", label=name)
        axes[2].plot(steps, [r["logprob_diff"] for r in rows], color=color, label=f"{name} canary")
        axes[2].plot(steps, [r["is_ratio_max"] - 1 for r in rows], color=color, linestyle=":",
                     label=f"{name} IS max - 1")
    axes[0].set(title="reward (constraints met), per step", xlabel="step")
    axes[1].set(title="greedy eval (eval_held_in), in the run", xlabel="step")
    axes[2].set(title="canary (|vLLM - trainer| per token) and IS ratio max - 1", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--runs", required=True, help="run folders, comma-separated (one per seed)")
    p.add_argument("--before", default="", help="evaluate.py --out of the untrained model")
    p.add_argument("--after", default="", help="evaluate.py --out of each run's final model, comma-separated")
    p.add_argument("--json", default="", help="write the summary here")
    p.add_argument("--plot", default="", help="write the curves here (PNG)")
    args = p.parse_args()
    runs = args.runs.split(",")
    afters = args.after.split(",") if args.after else [""] * len(runs)
    summaries, curves = [], []
    for run, after in zip(runs, afters):
        s, rows = summarize_run(run, after)
        summaries.append(s)
        curves.append((os.path.basename(run.rstrip("/")), rows))
        print(f"{run}: reward {s['reward_first_quarter']:.3f} -> {s['reward_last_quarter']:.3f} over {s['steps']} "
              f"steps, eval {s['eval_curve']}, canary {s['canary_min']:.3f}-{s['canary_max']:.3f}, IS max "
              f"{s['is_ratio_max']:.2f}, {s['seconds_per_step_median']:.0f} s/step" +
              (f", after {s['after']}" if "after" in s else ""))
    result = {"runs": summaries}
    if args.before:
        result["before"] = accuracies(args.before)
        print(f"before: {result['before']}")
    if all("after" in s for s in summaries):
        result["after"] = {name: spread([s["after"][name] for s in summaries]) for name in summaries[0]["after"]}
        print(f"after (mean, min-max over {len(summaries)} seeds): {result['after']}")
    result["reward_gain"] = spread([s["reward_last_quarter"] - s["reward_first_quarter"] for s in summaries])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(curves, args.plot)


if __name__ == "__main__":
    main()

"""PPO with and without value-model initialisation: the demo's reward curves over several seeds.

How: PPO/ppo.py --demo runs once per seed with the demo's `value_init_steps` (the critic is first fitted
alone to the initial policy's returns) and once with `--value_init_steps 0` (PPO starts on a fresh value
head), one run after the other. The table compares the mean reward over the first 10 steps, the first
and last quarter of the steps, and the critic's explained variance over the first 10 steps (before each
step's update), averaged over the seeds; the plot shows the per-step reward (5-step moving average, mean
over seeds) and explained variance. Other `--field value` pairs are passed to every run.

Commands (results: benchmarks/results/ppo_value_init_cpu.json, docs/img/ppo_value_init.png):
  python benchmarks/ppo_value_init.py --json benchmarks/results/ppo_value_init_cpu.json \\
      --plot docs/img/ppo_value_init.png      # 3 seeds x 2 variants x 80 steps: about 8 minutes on 2 cores
  python benchmarks/ppo_value_init.py --tiny  # 1 seed, 3 steps of 4 prompts: what tests/test_bench_loop.py runs
"""

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import ROOT, Table, add_output_flags, child_env, make_workdir, parser, write_json  # noqa: E402
from nanorlhf.tracking import new_figure, read_metrics, save_figure  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__, epilog="Other --field value pairs are passed to every run.")
    p.add_argument("--seeds", default="42,43,44", help="one pair of runs per seed, comma-separated")
    add_output_flags(p, tiny="1 seed, 3 steps of 4 prompts x 4, 2 init steps: the test",
                     workdir="keep the run folders here (default: a temporary folder)", plot="write a PNG here")
    args, extra = p.parse_known_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.tiny:
        args.seeds = args.seeds[:1]
        extra = ["--total_episodes", "48", "--prompts_per_step", "4", "--group_size", "4", "--value_init_steps", "2",
                 *extra]
    return args, extra


def run_ppo(seed, init, out_dir, extra):
    """One demo run; init None keeps the demo's value_init_steps. Returns its metrics rows."""
    flags = ["--demo", "--seed", str(seed), "--wandb", "false", "--save_every", "1000000", "--output_dir", out_dir,
             "--overwrite", "true", *extra, *(["--value_init_steps", "0"] if init == 0 else [])]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "PPO", "ppo.py"), *flags], cwd=ROOT,
                            capture_output=True, text=True, env=child_env())
    if result.returncode != 0:
        sys.exit(f"PPO run (seed {seed}, value init {init}) failed (exit {result.returncode}):\n"
                 f"{result.stderr[-3000:]}")
    return read_metrics(os.path.join(out_dir, "metrics.jsonl"))


def summarize(runs):
    """runs: one list of metrics rows per seed -> means over the seeds."""
    mean = lambda values: statistics.mean(values)  # noqa: E731
    quarter = max(1, len(runs[0]) // 4)
    per_step = [mean(run[i]["reward_mean"] for run in runs) for i in range(len(runs[0]))]
    early_ev = [r["explained_variance"] for run in runs for r in run[:10] if r.get("explained_variance") is not None]
    return {"reward_first_10_steps": mean(per_step[:10]), "reward_first_quarter": mean(per_step[:quarter]),
            "reward_last_quarter": mean(per_step[-quarter:]), "reward_per_step": per_step,
            "explained_variance_first_10_steps": mean(early_ev) if early_ev else None,
            "explained_variance_per_step": [mean(run[i].get("explained_variance") or 0.0 for run in runs)
                                            for i in range(len(runs[0]))]}


def plot(results, path, title):
    fig, axes = new_figure(1, 2, figsize=(12, 4))
    for name, result in results.items():
        reward = result["reward_per_step"]
        smooth = [statistics.mean(reward[max(0, i - 4) : i + 1]) for i in range(len(reward))]
        steps = range(1, len(reward) + 1)
        axes[0].plot(steps, smooth, label=name)
        axes[1].plot(steps, result["explained_variance_per_step"], label=name)
    axes[0].set(xlabel="PPO step", ylabel="mean reward (5-step moving average)")
    axes[1].set(xlabel="PPO step", ylabel="critic explained variance (before the update)", ylim=(-1, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def main(args, extra):
    workdir = make_workdir(args, "ppo_value_init-")
    variants = {"with value init": None, "without (value_init_steps 0)": 0}
    runs = {name: [] for name in variants}
    for seed in args.seeds:
        for name, init in variants.items():
            rows = run_ppo(seed, init, os.path.join(workdir, f"seed{seed}-init{'0' if init == 0 else 'demo'}"), extra)
            runs[name].append(rows)
            print(f"  seed {seed}, {name}: {len(rows)} steps, reward {rows[0]['reward_mean']:.3f} -> "
                  f"{rows[-1]['reward_mean']:.3f}", flush=True)
    results = {name: summarize(variant_runs) for name, variant_runs in runs.items()}
    print(f"\nmean over seeds {args.seeds}")
    table = Table(("variant", "<30"), ("reward steps 1-10", ">18.3f"), ("first quarter", ">14.3f"),
                  ("last quarter", ">13.3f"), ("EV steps 1-10", ">14.3f"))
    table.print_header()
    for name, r in results.items():
        table.print_row(name, r["reward_first_10_steps"], r["reward_first_quarter"], r["reward_last_quarter"],
                        r["explained_variance_first_10_steps"])
    if args.json:
        write_json(args.json, {"seeds": args.seeds, "extra_flags": extra, "results": results})
    if args.plot:
        plot(results, args.plot, f"PPO --demo with and without value-model initialisation, mean of seeds {args.seeds}")


if __name__ == "__main__":
    main(*parse_args())

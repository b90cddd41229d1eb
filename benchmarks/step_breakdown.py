"""Where a step's time goes, for every algorithm's demo: generate / score / reference log-probs / value / train / sync
(+ greedy eval where the script has one).

How: each algorithm script that exists among GRPO/grpo.py, PPO/ppo.py, RLOO/rloo.py, ReMax/remax.py, RAFT/raft.py,
Reinforce/reinforce.py and examples/r1-v0/grpo_r1.py runs its own `--demo` for `--steps` steps (`--total_episodes`
= steps x the demo's prompts_per_step x group_size, `--wandb false`, a temporary output folder), one script after
the other; or, with `--runs DIR ...`, the metrics.jsonl of existing run folders are read instead. The per-step
timers the scripts log (metrics.jsonl) are averaged over the steps after the first `--warmup` (the first step pays
vLLM's and PyTorch's warm-ups); a key a script does not log counts 0:
  generate  time_generate   the vLLM engine (ReMax: its sampled and its greedy pass)
  score     time_score      reward functions / reward model
  reference time_reference  log-probs with the adapter off (PPO: also the policy's, for its KL reward)
  value     time_value      the critic's values (PPO)
  train     time_train      log-probs with grad, backward, optimizer steps (PPO: policy and critic)
  sync      time_sync       merged LoRA weights pushed into the engine
  other     time_step minus the phases above: prompts, advantages, batching, logging
  eval      time_eval       greedy evaluation every eval_every steps (r1). It runs after the step's clock stops,
                            so it is not part of time_step; it is added on top, amortised over the timed steps.
Shares are of time_step + eval. Other `--field value` pairs are passed to every script (e.g. `--max_new_tokens 32`).

Commands (results: benchmarks/results/step_breakdown_cpu.json, docs/img/step_breakdown.png):
  python benchmarks/step_breakdown.py --json benchmarks/results/step_breakdown_cpu.json \\
      --plot docs/img/step_breakdown.png        # every demo, 5 steps each: about 5 minutes on 2 idle cores
  python benchmarks/step_breakdown.py --runs runs/grpo-20250101-120000 runs/ppo-20250101-130000   # read runs
  python benchmarks/step_breakdown.py --tiny    # GRPO only, 2 steps of 8 prompts: what tests/test_bench_loop.py runs
"""

import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import (  # noqa: E402
    ROOT, Table, add_output_flags, child_env, machine, make_workdir, parser, settings, write_json)
from nanorlhf.tracking import new_figure, read_metrics, save_figure  # noqa: E402

SCRIPTS = {  # algorithm: script, in the order of the table
    "grpo": "GRPO/grpo.py",
    "ppo": "PPO/ppo.py",
    "rloo": "RLOO/rloo.py",
    "remax": "ReMax/remax.py",
    "raft": "RAFT/raft.py",
    "reinforce": "Reinforce/reinforce.py",
    "r1": "examples/r1-v0/grpo_r1.py",
}
PHASES = ("generate", "score", "reference", "value", "train", "sync")  # inside time_step
COLORS = {"generate": "tab:blue", "score": "tab:olive", "reference": "tab:purple", "value": "tab:brown",
          "train": "tab:orange", "sync": "tab:red", "other": "tab:gray", "eval": "tab:cyan"}


def parse_args(argv=None):
    p = parser(__doc__, epilog="Other --field value pairs are passed to every script.")
    p.add_argument("--scripts", default=",".join(SCRIPTS), help="algorithms to run, comma-separated "
                   "(those whose script does not exist yet are skipped)")
    p.add_argument("--steps", type=int, default=5, help="steps per demo run, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run not counted")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="read these run folders instead of running the demos")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs; 0 = library default")
    add_output_flags(p, tiny="GRPO only, 2 steps of 8 prompts: the test",
                     workdir="keep the run folders here (default: a temporary folder); a complete run already "
                     "there is reused, so an interrupted benchmark continues where it stopped",
                     plot="write a PNG stacked bar chart here")
    args, extra = p.parse_known_args(argv)
    if args.tiny:
        args.scripts, args.steps = "grpo", 2
        extra = ["--prompts_per_step", "8", *extra]
    args.scripts = args.scripts.split(",")
    unknown = set(args.scripts) - set(SCRIPTS)
    if unknown:
        p.error(f"--scripts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SCRIPTS)}")
    if args.steps <= args.warmup and not args.runs:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): no step would be timed")
    return args, extra


def episodes_per_step(path, extra):
    """prompts_per_step x group_size of the script's --demo Config (with the extra flags applied)."""
    from nanorlhf.config import load_module, parse_config

    module = load_module(path)
    cfg = parse_config(module.Config, ["--demo", *extra], demo=module.DEMO)
    return cfg.prompts_per_step * cfg.group_size


def run_demo(name, path, out_dir, args, extra):
    flags = ["--demo", "--total_episodes", str(args.steps * episodes_per_step(path, extra)), "--wandb", "false",
             "--save_every", "1000000", "--output_dir", out_dir, "--overwrite", "true", *extra]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, path, *flags], cwd=ROOT, capture_output=True, text=True,
                            env=child_env(args.threads))
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(f"  {name}: FAILED (exit {result.returncode}):\n{result.stderr[-3000:]}", flush=True)
        return None
    print(f"  {name}: {wall:.0f} s with start-up", flush=True)
    return wall


def breakdown(metrics_path, warmup):
    """Mean seconds per phase over the steps after `warmup` (missing keys count 0)."""
    rows = read_metrics(metrics_path)[warmup:]
    if not rows:
        return None
    mean = lambda key: statistics.mean(r.get(key) or 0.0 for r in rows)  # noqa: E731
    seconds = {phase: mean(f"time_{phase}") for phase in PHASES}
    step = mean("time_step")
    seconds["other"] = step - sum(seconds.values())
    seconds["eval"] = mean("time_eval")
    total = step + seconds["eval"]
    return {"timed_steps": len(rows), "steps": [r["step"] for r in rows], "step_seconds": step,
            "total_seconds": total, "seconds": seconds, "share": {k: v / total for k, v in seconds.items()},
            "engine_builds": rows[-1].get("engine_builds"),
            "episodes_per_step": rows[0]["episodes"] // rows[0]["step"],
            "response_length_mean": statistics.mean(r.get("response_length_mean") or 0.0 for r in rows)}


def print_table(results):
    columns = [c for c in (*PHASES, "other", "eval") if c == "other" or any(r["seconds"][c] for r in results.values())]
    print("mean seconds per step (share of step + eval); phases no algorithm logs are left out")
    table = Table(("algorithm", "<10"), ("steps", ">5"), ("s/step", ">7.2f"), *((c, ">15") for c in columns))
    table.print_header()
    for name, r in results.items():
        table.print_row(name, r["timed_steps"], r["step_seconds"],
                        *(f"{r['seconds'][c]:>7.3f} ({r['share'][c]:>4.0%})" for c in columns))


def plot(results, path, title):
    import matplotlib.ticker

    names = list(results)
    segments = [*PHASES, "other", "eval"]
    fig, axes = new_figure(1, 2, figsize=(12, 0.6 * len(names) + 2.5))
    for ax, key, label in ((axes[0], "seconds", "seconds per step (mean)"), (axes[1], "share", "share of step")):
        left = [0.0] * len(names)
        for segment in segments:
            values = [max(results[n][key][segment], 0.0) for n in names]
            if not any(values):
                continue
            ax.barh(names, values, left=left, color=COLORS[segment], label=segment)
            left = [a + b for a, b in zip(left, values)]
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def main(args, extra):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results, failed, skipped = {}, [], []
    if args.runs:
        folders = {os.path.basename(os.path.normpath(d)): d for d in args.runs}
        print(f"reading {len(folders)} run folder(s); first {args.warmup} step(s) of each not counted")
    else:
        workdir = make_workdir(args, "step_breakdown-")
        folders = {}
        print(f"running each demo for {args.steps} steps on {device} ({args.warmup} warm-up not counted); "
              f"extra flags: {' '.join(extra) or 'none'}", flush=True)
        for name in args.scripts:
            path = os.path.join(ROOT, SCRIPTS[name])
            if not os.path.exists(path):
                skipped.append(name)
                print(f"  {name}: {SCRIPTS[name]} does not exist, skipped", flush=True)
                continue
            out_dir = os.path.join(workdir, name)
            if args.workdir and len(read_metrics(os.path.join(out_dir, "metrics.jsonl"))) == args.steps:
                print(f"  {name}: complete run found in {out_dir}, reused", flush=True)  # an interrupted benchmark
            elif run_demo(name, path, out_dir, args, extra) is None:
                failed.append(name)
                continue
            folders[name] = out_dir
    for name, folder in folders.items():
        row = breakdown(os.path.join(folder, "metrics.jsonl"), args.warmup)
        if row is None:
            print(f"  {name}: no step after the warm-up in {folder}/metrics.jsonl", flush=True)
            failed.append(name)
        else:
            results[name] = row
    print()
    if results:
        print_table(results)
    if args.json:
        flags = settings(args, ("json", "plot", "workdir", "runs"))
        flags["runs"] = list(folders) if args.runs else None  # folder names, not this machine's paths
        write_json(args.json, {**machine(device), "settings": flags, "extra_flags": extra, "results": results,
                               "skipped": skipped, "failed": failed})
    if args.plot and results:
        plot(results, args.plot, f"step time by phase, each algorithm's --demo on {device} "
             f"(mean of {', '.join(str(r['timed_steps']) for r in results.values())} timed steps)")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(*parse_args())

"""One process vs `torchrun --nproc_per_node 2` on the same GRPO demo (CPU, gloo): the same global batch, so the
same numbers (docs/scaling.md). Prints per-step reward_mean of both and |loss| / |grad_norm| differences, writes
--json and a --plot of reward_mean per step and the differences on a log scale.

    .venv/bin/python benchmarks/ranks_equivalence.py --json benchmarks/results/ranks_equivalence_cpu.json \
        --plot docs/img/scaling_cpu.png                  (20 steps of 32 prompts x 8 completions, about 3 minutes)
    --runs ONE TWO                                       plots two finished run folders instead of running them

Throughput is not compared: on 2 cores the two ranks share the cores that one process had alone.
"""

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import ROOT, Table, add_output_flags, parser, write_json  # noqa: E402
from nanorlhf.tracking import new_figure, read_metrics, save_figure  # noqa: E402


def run(output_dir, ranks, episodes):
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    subprocess.run([*launcher, os.path.join(ROOT, "GRPO", "grpo.py"), "--demo", "--total_episodes", str(episodes),
                    "--wandb", "false", "--export_model", "false", "--output_dir", output_dir], check=True, cwd=ROOT)
    return output_dir


def main():
    p = parser(__doc__)
    p.add_argument("--runs", nargs=2, help="two finished run folders: one process, two ranks")
    p.add_argument("--episodes", type=int, default=5120)  # 20 steps of the demo's 256 episodes
    add_output_flags(p, plot="write a PNG of reward_mean per step and the differences here")
    args = p.parse_args()
    if args.runs:
        one, two = args.runs
    else:
        tmp = tempfile.mkdtemp(prefix="ranks-")
        one, two = run(os.path.join(tmp, "one"), 1, args.episodes), run(os.path.join(tmp, "two"), 2, args.episodes)
    rows = [{"step": a["step"], "reward_mean_1": a["reward_mean"], "reward_mean_2": b["reward_mean"],
             "loss_diff": abs(a["loss"] - b["loss"]), "grad_norm_diff": abs(a["grad_norm"] - b["grad_norm"])}
            for a, b in zip(*(read_metrics(os.path.join(folder, "metrics.jsonl")) for folder in (one, two)))]
    table = Table(("step", ">4"), ("reward 1 proc", ">13.6f"), ("reward 2 ranks", ">14.6f"), ("|loss diff|", ">11.2e"),
                  ("|grad_norm diff|", ">16.2e"))
    table.print_header()
    for r in rows:
        table.print_row(r["step"], r["reward_mean_1"], r["reward_mean_2"], r["loss_diff"], r["grad_norm_diff"])
    if args.json:
        write_json(args.json, {"runs": [one, two], "steps": rows})
    if args.plot:
        fig, (left, right) = new_figure(1, 2, figsize=(10, 3.6))
        steps = [r["step"] for r in rows]
        left.plot(steps, [r["reward_mean_1"] for r in rows], "o-", label="1 process")
        left.plot(steps, [r["reward_mean_2"] for r in rows], "x--", label="torchrun, 2 ranks")
        left.set(xlabel="step", ylabel="reward_mean", title="GRPO demo: the same batch on 1 or 2 processes")
        left.legend()
        right.semilogy(steps, [max(r["loss_diff"], 1e-12) for r in rows], "o-", label="|loss difference|")
        right.semilogy(steps, [max(r["grad_norm_diff"], 1e-12) for r in rows], "x-", label="|grad_norm difference|")
        right.set(xlabel="step", title="1 vs 2 ranks: float32 rounding, grown by Adam")
        right.legend()
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()

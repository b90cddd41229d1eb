"""Persistent vLLM engine (weights pushed in place) against rebuilding the engine after every update.

The original nanoRLHF, after each optimizer step, merged the LoRA adapter into the base model, saved the merged
model to disk and constructed a new vLLM `LLM` from that folder. nanoRLHF keeps one engine for the whole run and
reloads the merged LoRA layers into it in place (`Run.sync` -> `RolloutEngine.push_weights`).

How: the SAME GRPO loop (`GRPO/grpo.py`'s `main`, imported as a module) runs twice, each in a subprocess of this
script (`--strategy persistent|rebuild`), on the same model, data, seed and settings:
- persistent: the loop as it is.
- rebuild:    `nanorlhf.run.Run.sync` is replaced by `rebuild_sync` below, which inside the same
              `timed("time_sync")` deep-copies the peft policy, `merge_and_unload()`s it, `save_pretrained`s it
              and the tokenizer to a folder, deletes the old engine (`del engine.llm`, gc.collect()) and builds a
              new `RolloutEngine` from that folder, so `engine_builds` in metrics.jsonl counts the rebuilds.
Per-step `time_step` and `time_sync` come from each run's metrics.jsonl; the first `--warmup` steps are not counted
(the first generate pays vLLM's warm-up). With `--repeats N` the two strategies alternate (persistent first, then
rebuild first, ...) and the timed steps of all runs are pooled, so a change in machine load hits both sides.
Reported per strategy: mean step seconds, mean sync seconds, sync share of the step, engine_builds, and the mean
logprob canary (a rebuild is a correct sync too: the canary stays small); and the rebuild/persistent ratio of
step time. The goal (issue): sync under 5% of a step with the persistent engine.

Model: `nanorlhf.tiny.build_tiny_policy` with hidden 512 and 4 layers (random weights, head size 64), so merging
and saving are not free; the GRPO `--demo` defaults otherwise (addition prompts from `demo:addition-data`, reward
`nanorlhf.tasks:addition_reward`, 32 prompts x 8 completions, 8 new tokens, 2 epochs). Any further `--field value`
is passed to GRPO in both runs (e.g. `--max_new_tokens 64`). A vLLM build's cost is mostly fixed (engine start,
compilation, KV-cache allocation), so small models understate nothing but the weight loading of real ones.

Commands (results: benchmarks/results/engine_rebuild_cpu.json, docs/img/engine_rebuild.png):
  python benchmarks/engine_rebuild.py --json benchmarks/results/engine_rebuild_cpu.json \\
      --plot docs/img/engine_rebuild.png      # 6 steps x 2 strategies x 2 repeats: about 7 minutes on 2 idle cores
  python benchmarks/engine_rebuild.py --tiny  # demo model, 2 small steps, 1 repeat: what tests/test_bench_loop.py runs
  python benchmarks/engine_rebuild.py --strategy rebuild --demo --output_dir runs/rebuild   # one side only
"""

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import (  # noqa: E402
    ROOT, Table, add_output_flags, check_head_size, child_env, in_turn, machine, make_workdir, parser, settings,
    write_json)
from nanorlhf.config import load_module  # noqa: E402
from nanorlhf.tracking import new_figure, save_figure  # noqa: E402

STRATEGIES = ("persistent", "rebuild")


def parse_args(argv=None):
    p = parser(__doc__, epilog="Other --field value pairs are passed to GRPO/grpo.py in both runs.")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the random model (head size 64)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the random model")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run not counted")
    p.add_argument("--repeats", type=int, default=2, help="runs per strategy, alternating which goes first")
    p.add_argument("--prompts_per_step", type=int, default=32, help="prompts per step (GRPO demo: 32)")
    p.add_argument("--group_size", type=int, default=8, help="completions per prompt (GRPO demo: 8)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs; 0 = library default")
    add_output_flags(p, tiny="the demo model, 4 prompts x 4, 2 steps, 1 repeat: the test",
                     workdir="keep the model and run folders here (default: a temporary folder); complete runs "
                     "already there are reused, so an interrupted benchmark continues where it stopped",
                     plot="write a PNG bar chart here")
    p.add_argument("--strategy", choices=STRATEGIES, help="FIRST argument only: run ONE GRPO run with this sync; "
                   "every argument after it goes to GRPO/grpo.py")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--strategy"]:  # the worker: everything after the strategy is GRPO's
        if len(argv) < 2 or argv[1] not in STRATEGIES:
            p.error(f"--strategy takes one of {', '.join(STRATEGIES)}")
        return argparse.Namespace(strategy=argv[1]), argv[2:]
    args, grpo_flags = p.parse_known_args(argv)
    if args.strategy:
        p.error("--strategy must come first; the arguments after it go to GRPO/grpo.py")
    if args.tiny:
        args.hidden, args.layers, args.steps, args.repeats = 128, 2, 2, 1  # the demo model's shape
        args.prompts_per_step, args.group_size = 4, 4
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): no step would be timed")
    check_head_size(p, args.hidden)
    return args, grpo_flags


# --- the worker: one GRPO run ---------------------------------------------------------------------------------


def rebuild_sync(self):
    """What the original nanoRLHF did after every update: merge the LoRA into a copy of the model, save it to disk,
    and build a new vLLM engine from that folder (replaces `nanorlhf.run.Run.sync` in the rebuild strategy)."""
    import torch

    from nanorlhf.engine import RolloutEngine

    holder = getattr(self, "trainer", self)  # where the run keeps whether the engine is behind the policy
    if not holder.engine_stale:
        return
    holder.engine_stale = False
    with self.timed("time_sync"):
        merged = copy.deepcopy(self.policy).merge_and_unload()
        folder = os.path.join(self.output_dir, "merged-model")
        merged.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        del merged
        used = torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
        self.engine.close()  # the old engine must go before the new one takes its memory
        if torch.cuda.is_available():
            freed = used - (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0])
            if freed < 0.5 * self.cfg.vllm_gpu_memory * torch.cuda.mem_get_info()[1]:
                sys.exit(f"rebuild: closing the old engine freed {freed / 2**30:.1f} GiB of the "
                         f"{self.cfg.vllm_gpu_memory:g} share it held: a new engine would not fit beside it")
        self.engine = RolloutEngine(folder, self.max_model_len, self.cfg.dtype, self.cfg.vllm_gpu_memory,
                                    self.cfg.seed)
        if hasattr(self, "rollout"):  # the step's generation reads the engine from there
            self.rollout.engine = self.engine


def worker(strategy, grpo_argv):
    """One GRPO run with the given sync; its peak RSS goes to <output_dir>/engine_rebuild_worker.json."""
    from nanorlhf.config import parse_config
    from nanorlhf.errors import exit_on_user_error

    grpo = load_module(os.path.join(ROOT, "GRPO", "grpo.py"))
    if strategy == "rebuild":
        import functools

        import nanorlhf.run
        from nanorlhf.engine import RolloutEngine

        nanorlhf.run.Run.sync = rebuild_sync
        # the original nanoRLHF never slept its engine; and vLLM's sleep-mode allocator serves one engine per process
        RolloutEngine.__init__ = functools.partialmethod(RolloutEngine.__init__, sleep_mode=False)
    with exit_on_user_error():
        cfg = parse_config(grpo.Config, grpo_argv, demo=grpo.DEMO)
        grpo.main(cfg)
    if cfg.output_dir:
        with open(os.path.join(cfg.output_dir, "engine_rebuild_worker.json"), "w") as f:
            json.dump({"strategy": strategy,
                       "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, f)


# --- the parent: both strategies, the table -------------------------------------------------------------------


def build_model(workdir, args):
    if args.tiny:
        return "demo:addition"
    from nanorlhf.tasks import addition_rows
    from nanorlhf.tiny import build_tiny_policy

    folder = os.path.join(workdir, "model")
    if os.path.exists(os.path.join(folder, "config.json")):  # kept from an interrupted benchmark
        return folder
    rows = addition_rows(2000, seed=args.seed)
    texts = [f"{r['prompt']} {r['answer']}" for r in rows] + ["user assistant system"]
    return build_tiny_policy(folder, texts, hidden_size=args.hidden, num_layers=args.layers, seed=args.seed)


def run_strategy(strategy, model, out_dir, args, grpo_flags):
    flags = ["--demo", "--model", model, "--prompts_per_step", str(args.prompts_per_step),
             "--group_size", str(args.group_size),
             "--total_episodes", str(args.steps * args.prompts_per_step * args.group_size),
             "--seed", str(args.seed), "--save_every", "1000000", "--wandb", "false",
             "--output_dir", out_dir, "--overwrite", "true", *grpo_flags]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--strategy", strategy, *flags], cwd=ROOT,
                            capture_output=True, text=True, env=child_env(args.threads))
    if result.returncode != 0:
        sys.exit(f"{strategy} run failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    with open(os.path.join(out_dir, "engine_rebuild_worker.json")) as f:
        worker_info = json.load(f)
    with open(os.path.join(out_dir, "engine_rebuild_worker.json"), "w") as f:
        json.dump({**worker_info, "wall_seconds": time.perf_counter() - start}, f)
    return read_run(out_dir)


def read_run(out_dir):
    """A finished run: its per-step numbers (metrics.jsonl) and the worker's peak RSS and wall time."""
    from nanorlhf.tracking import read_metrics

    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    with open(os.path.join(out_dir, "engine_rebuild_worker.json")) as f:
        worker_info = json.load(f)
    keys = ("step", "time_step", "time_sync", "time_generate", "time_train", "engine_builds", "logprob_diff")
    return {"steps": [{k: r.get(k) for k in keys} for r in rows], **worker_info}


def summarize(runs, warmup):
    timed = [s for run in runs for s in run["steps"][warmup:]]
    step = statistics.mean(s["time_step"] for s in timed)
    sync = statistics.mean(s["time_sync"] for s in timed)
    return {
        "timed_steps": len(timed),
        "step_seconds": step,
        "step_seconds_median": statistics.median(s["time_step"] for s in timed),
        "sync_seconds": sync,
        "sync_share": sync / step,
        "generate_seconds": statistics.mean(s["time_generate"] for s in timed),
        "train_seconds": statistics.mean(s["time_train"] for s in timed),
        "logprob_diff": statistics.mean(s["logprob_diff"] for s in timed),
        # engine_builds of every logged step of every run (warm-up included): the rebuild counter
        "engine_builds": [[s["engine_builds"] for s in run["steps"]] for run in runs],
        "max_rss_gib": max(run["max_rss_gib"] for run in runs),
        "run_wall_seconds": [round(run["wall_seconds"], 1) for run in runs],
        "all_step_seconds": [round(s["time_step"], 3) for s in timed],
        "all_sync_seconds": [round(s["time_sync"], 4) for s in timed],
    }


def print_table(results, ratios):
    table = Table(("strategy", "<11"), ("s/step", ">8.2f"), ("s/sync", ">8.3f"), ("sync share", ">11.1%"),
                  ("gen s", ">7.2f"), ("train s", ">8.2f"), ("canary", ">8.4f"), ("max RSS GiB", ">12.2f"),
                  (" engine_builds (last step of each run)", ""))  # the leading space: two before this column
    table.print_header()
    for name, r in results.items():
        table.print_row(name, r["step_seconds"], r["sync_seconds"], r["sync_share"], r["generate_seconds"],
                        r["train_seconds"], r["logprob_diff"], r["max_rss_gib"],
                        " " + ", ".join(str(run[-1]) for run in r["engine_builds"]))
    print(f"rebuild/persistent step time: {ratios['step_seconds']:.2f}x")
    print(f"rebuild/persistent sync time: {ratios['sync_seconds']:.0f}x")
    share = results["persistent"]["sync_share"]
    print(f"persistent sync share of a step: {share:.1%} (goal: under 5%: {'met' if share < 0.05 else 'NOT met'})")


def plot(results, ratios, path, title):
    names = list(results)
    sync = [results[n]["sync_seconds"] for n in names]
    rest = [results[n]["step_seconds"] - results[n]["sync_seconds"] for n in names]
    fig, ax = new_figure(figsize=(6, 4))
    ax.bar(names, rest, color="tab:blue", label="rest of the step (generate, score, log-probs, train)")
    bars = ax.bar(names, sync, bottom=rest, color="tab:red", label="sync (weights into the engine)")
    ax.bar_label(bars, [f"sync {results[n]['sync_share']:.1%} of step" for n in names])
    ax.set_ylabel("seconds per step (mean)")
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title}\nrebuild/persistent step time = {ratios['step_seconds']:.2f}x", fontsize=9)
    save_figure(fig, path)


def main(args, grpo_flags):
    import torch

    workdir = make_workdir(args, "engine_rebuild-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(workdir, args)
    model_desc = "the demo model (hidden 128, 2 layers)" if args.tiny else \
        f"random Qwen2, hidden {args.hidden}, {args.layers} layers"
    episodes = args.prompts_per_step * args.group_size
    print(f"GRPO --demo on {device} with {model_desc}; {args.prompts_per_step} prompts x {args.group_size} = "
          f"{episodes} episodes/step; {args.steps} steps per run ({args.warmup} warm-up not counted), "
          f"{args.repeats} run(s) per strategy; extra GRPO flags: {' '.join(grpo_flags) or 'none'}", flush=True)
    runs = {name: [] for name in STRATEGIES}
    for repeat in range(args.repeats):
        for name in in_turn(STRATEGIES, repeat):
            out_dir = os.path.join(workdir, f"{name}-{repeat}")
            if args.workdir and os.path.exists(os.path.join(out_dir, "engine_rebuild_worker.json")):
                run = read_run(out_dir)  # a complete run of an interrupted benchmark
                print(f"  run {repeat + 1} {name}: complete run found in {out_dir}, reused")
            else:
                run = run_strategy(name, model, out_dir, args, grpo_flags)
            runs[name].append(run)
            print(f"  run {repeat + 1} {name}: steps {[round(s['time_step'], 2) for s in run['steps']]} s, sync "
                  f"{[round(s['time_sync'], 3) for s in run['steps']]} s, engine_builds "
                  f"{[s['engine_builds'] for s in run['steps']]} ({run['wall_seconds']:.0f} s with start-up)",
                  flush=True)
    results = {name: summarize(name_runs, args.warmup) for name, name_runs in runs.items()}
    ratios = {key: results["rebuild"][key] / results["persistent"][key] for key in ("step_seconds", "sync_seconds")}
    print()
    print_table(results, ratios)
    if args.json:
        write_json(args.json, {**machine(device), "model": model_desc,
                               "settings": settings(args, ("json", "plot", "workdir", "strategy")),
                               "grpo_flags": grpo_flags, "results": results, "ratios": ratios, "runs": runs})
    if args.plot:
        plot(results, ratios, args.plot, f"GRPO demo step on {device}, {model_desc}, {episodes} episodes")


if __name__ == "__main__":
    cli, rest = parse_args()
    if cli.strategy:
        worker(cli.strategy, rest)
    else:
        main(cli, rest)

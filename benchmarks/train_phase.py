"""Tokens per second of the training phase, and its model-FLOPs utilisation against this machine's matmul throughput.

The training phase of one GRPO step in the user's configuration (LoRA r 64 on every linear layer, dropout 0.05,
gradient checkpointing): the reference pass (adapter off, no grad), the old log-probs pass (no dropout, no grad,
the sampler's view), then forward + backward of every training micro-batch and one AdamW step. Each variant adds
one of issue 14's changes to the one before, all on the same model and batch, taking turns round by round:

  padded      right-padded micro-batches, each LM-head chunk checkpointed (backward reruns its entropy and
              sampler view), the no-grad passes on the training budget, AdamW's for-each implementation
  packed      + sequences packed into shared rows (position_ids restart per sequence; rows as wide as the longest)
  fused_head  + the LM head's log-probs, entropy, sampler view and input gradient in one pass; backward only
              scales that gradient (before 2026-12-03: backward recomputed the logits once)
  nograd      + no-grad passes on 4x the training budget (micro_batch_tokens_nograd's default)
  fused_adam  + fused AdamW
  no_entropy  + the no-grad passes compute no entropy (nothing reads it there)
  no_mask     + right-padded micro-batches (where each sequence fills a row alone, or packing does not work) without
              an attention mask, which causal attention does not need
  fused_lora  + each LoRA linear in one autograd function (nanorlhf/lora.py): the scaling and the sums inside the
              matmuls instead of passes over (tokens, features) tensors: what nanoRLHF runs now

Tokens/s counts prompt + completion tokens of the step, over wall seconds; this process's CPU seconds are reported
too (on shared cores run with OMP_NUM_THREADS=1 and compare those). MFU = model FLOPs / seconds / the matmul FLOP/s measured
in the same run (a square matmul in the run's dtype): per token 2 FLOPs per decoder weight in a no-grad pass and 4
with gradients (forward + the input gradient; the frozen base needs no weight gradient), the LM head's 2 x vocab x
hidden per pass at completion tokens only (x2 with gradients), attention 4 x heads x head_dim per real (query, key)
pair per layer (x3 with gradients); checkpointing's recomputations and padding are not counted as useful.

  python benchmarks/train_phase.py --shape small --dtype float32 --json benchmarks/results/train_phase_small_fp32.json
  python benchmarks/train_phase.py --shape demo --tiny      # seconds: what tests/test_benchmarks.py runs
"""

import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import Table, add_output_flags, in_turn, parser, write_json  # noqa: E402
from nanorlhf import logprobs  # noqa: E402
from nanorlhf.logprobs import completion_logprobs, padding_fraction, token_budget_batches  # noqa: E402
from nanorlhf.lora import fuse_lora_layers  # noqa: E402
from nanorlhf.policy import evaluating, load_policy  # noqa: E402
from nanorlhf.tiny import build_policy_at_shape, build_tiny_policy  # noqa: E402

VARIANTS = ("padded", "packed", "fused_head", "nograd", "fused_adam", "no_entropy", "no_mask", "fused_lora")
SHAPES = {"demo": dict(hidden_size=128, num_layers=2), "small": dict(hidden_size=512, num_layers=4)}


class CheckpointedHead(torch.nn.Linear):
    """Not a plain nn.Linear: completion_logprobs takes its checkpointed fallback for the LM head."""


def parse_args():
    p = parser(__doc__)
    p.add_argument("--shape", choices=SHAPES, default="small", help="demo: hidden 128, 2 layers, vocab 512; "
                   "small: hidden 512, 4 layers, vocab 32768 (head size 64 in both)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--lengths", choices=("limit", "early"), default="early",
                   help="limit: every completion runs to max_new_tokens; early: uniform in 8..max_new_tokens")
    p.add_argument("--micro_batch_tokens", type=int, default=8192, help="the training budget (the scripts' default)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    add_output_flags(p, tiny="a few seconds: 2 prompts, 16 tokens, one round")
    return p.parse_args()


def matmul_flops(dtype, n=1024, repeats=5):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops(model, prompts, completions):
    """Useful FLOPs of one training phase (see the module docstring)."""
    config = model.get_base_model().config
    decoder = model.get_base_model().get_decoder()
    weights = sum(p.numel() for p in decoder.parameters()) - decoder.get_input_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    completion_tokens = sum(map(len, completions))
    pairs = sum((len(p) + len(c)) ** 2 / 2 for p, c in zip(prompts, completions))
    linear = 2 * weights * tokens  # one pass
    head = 2 * config.vocab_size * config.hidden_size * completion_tokens
    attention = 4 * config.num_attention_heads * head_dim * config.num_hidden_layers * pairs
    no_grad = linear + head + attention
    return 2 * no_grad + 2 * linear + 2 * head + 3 * attention  # reference, old log-probs, training


def training_phase(model, optimizer, prompts, completions, variant, budget):
    """One step's training phase as Run.update does it, with the variant's changes switched on."""
    level = VARIANTS.index(variant)
    packed, nograd_budget, entropy = level >= 1, budget * 4 if level >= 3 else budget, level < 5
    head = model.get_base_model().lm_head
    head.__class__ = torch.nn.Linear if level >= 2 else CheckpointedHead
    logprobs.MASK_PADDING = level < 6
    fuse_lora_layers(model, fused=level >= 7)
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]

    def run(idx, **kwargs):
        return completion_logprobs(model, [prompts[i] for i in idx], [completions[i] for i in idx], 0,
                                   packed=packed, **kwargs)

    with evaluating(model):
        with model.disable_adapter():  # the reference
            for idx in token_budget_batches(lengths, nograd_budget, packed):
                run(idx, entropy=entropy)
        for idx in token_budget_batches(lengths, nograd_budget, packed):  # old log-probs: the sampler's view
            run(idx, sampling=(1.0, 1.0), entropy=entropy)
    batches = token_budget_batches(lengths, budget, packed)
    for idx in batches:
        out = run(idx)
        (out["logprobs"] * out["mask"]).sum().div(len(lengths)).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return padding_fraction(batches, lengths, model if packed else None)


def main():
    args = parse_args()
    if args.tiny:
        args.prompts, args.group_size, args.max_new_tokens, args.rounds, args.micro_batch_tokens = 2, 4, 16, 1, 64
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        if args.shape == "demo":
            path = build_tiny_policy(folder, ["What is 1 + 2? 3"] * 50, **SHAPES["demo"])
        else:
            path = build_policy_at_shape(folder, **SHAPES["small"])
        model = load_policy(path, 64, 16, 0.05, "all-linear", args.dtype, gradient_checkpointing=True)
    vocab = model.get_base_model().config.vocab_size
    rng = random.Random(0)
    prompts, completions = [], []
    for _ in range(args.prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(20, 60))]
        for _ in range(args.group_size):
            length = args.max_new_tokens if args.lengths == "limit" else rng.randint(8, args.max_new_tokens)
            prompts.append(prompt)
            completions.append([rng.randrange(3, vocab) for _ in range(length)])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizers = {"foreach": torch.optim.AdamW(trainable, lr=1e-6, weight_decay=0.0, foreach=True),
                  "fused": torch.optim.AdamW(trainable, lr=1e-6, weight_decay=0.0, fused=True)}
    peak = matmul_flops(model.get_base_model().dtype)
    flops = model_flops(model, prompts, completions)
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    seconds, cpu_seconds, padding = {v: [] for v in variants}, {v: [] for v in variants}, {}
    for round_ in range(args.rounds + 1):
        order = in_turn(variants, round_)
        for variant in order:
            optimizer = optimizers["fused" if VARIANTS.index(variant) >= 4 else "foreach"]
            start, cpu_start = time.perf_counter(), time.process_time()
            padding[variant] = training_phase(model, optimizer, prompts, completions, variant, args.micro_batch_tokens)
            if round_ > 0:
                seconds[variant].append(time.perf_counter() - start)
                cpu_seconds[variant].append(time.process_time() - cpu_start)
    results = {"args": vars(args), "threads": torch.get_num_threads(), "tokens": tokens, "model_flops": flops,
               "matmul_flops_per_second": peak, "variants": {}}
    print(f"{args.shape} {args.dtype} {args.lengths} {args.max_new_tokens} tokens, {tokens} tokens per step, "
          f"matmul {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    if variants[0] != "padded":
        print(f"the 'vs padded' columns: against {variants[0]}, the first variant measured")
    table = Table(("variant", "<11"), ("s/step", ">7.2f"), ("tokens/s", ">9.0f"), ("MFU", ">6.1%"),
                  ("padding", ">8.2f"), ("vs padded", ">9"), ("CPU s", ">7.2f"), ("vs padded (CPU s)", ">18"))
    table.print_header()
    base, cpu_base = statistics.median(seconds[variants[0]]), statistics.median(cpu_seconds[variants[0]])
    for variant in variants:
        s, cpu = statistics.median(seconds[variant]), statistics.median(cpu_seconds[variant])
        row = {"seconds": seconds[variant], "cpu_seconds": cpu_seconds[variant], "median_seconds": s,
               "tokens_per_second": tokens / s, "mfu": flops / s / peak, "padding_fraction": padding[variant],
               "speedup_vs_padded": base / s, "cpu_speedup_vs_padded": cpu_base / cpu}
        results["variants"][variant] = row
        table.print_row(variant, s, tokens / s, row["mfu"], padding[variant], f"{base / s:.2f}x", cpu,
                        f"{cpu_base / cpu:.2f}x")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()

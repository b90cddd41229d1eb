"""Generation with one seed per completion (what the rollout engine does) against the same requests without seeds:
what reproducible sampling costs in vLLM's generate.

`nanorlhf.engine.RolloutEngine.generate` sends every completion as its own request with its own
`SamplingParams(seed=...)`: a step's samples all differ, and a rerun (or a resumed run) draws exactly the same ones.
vLLM then gives each request its own torch.Generator, and its sampler draws that request's noise separately
(vllm/v1/sample/ops/topk_topp_sampler.py: on CPU, `forward_cpu` draws one seed per request and step from its
generator in a Python loop; on CUDA, see docs/performance.md "Seeded sampling").

Three ways to ask for the same completions, each timed on the same engine, prompts and shapes:
- seeded:      G requests per prompt, n=1, each with its own seed: RolloutEngine.generate's requests.
- unseeded:    one request per prompt with n=G and no seed (vLLM fans it out into G child requests).
- unseeded_n1: G requests per prompt, n=1, no seed: separates the cost of the seeds from that of the fan-out.
All three use `ignore_eos=True` (every completion is exactly `--max_new_tokens` long, so all do the same work),
`detokenize=False` (the widened vocabulary has ids the tokenizer lacks; the engine's detokenizing costs the same
with or without seeds), `logprobs=0` (the sampled token's log-prob, as the engine asks) and the engine's settings
(RolloutEngine: prefix caching, whole-prompt prefill on CPU). After one warm-up call of each, the variants
alternate (the order rotates every repeat), `--repeats` times per dtype; the table shows medians of wall seconds
and of this process's CPU seconds (the work, less sensitive to other processes on shared cores), generated tokens
per second of each, and the ratios seeded/other of both.
It also checks what the seeds buy: whether a variant's completions are identical from one repeat to the next.
Last, the only work the seeds add to vLLM's CPU sampler is timed on its own (`seed_draw_seconds`), as a share of
a seeded call: what the end-to-end ratios cannot resolve on busy cores.

Model: `nanorlhf.tiny.build_tiny_policy` (random weights, head size 64) with `--hidden`/`--layers`, its embedding
widened to `--vocab` tokens (32768 by default: a realistic vocabulary makes the sampler's per-token work
realistic; the prompts use only the tiny tokenizer's ids). A small model makes the forward pass cheap, so the
sampler's share of the time, and any per-request overhead, is larger than at a real model's size: an upper bound.

Commands (results: benchmarks/results/sampling_seeds_cpu*.json):
  python benchmarks/sampling_seeds.py --json benchmarks/results/sampling_seeds_cpu.json
      # 32 prompts x 8 completions x 32 tokens, vocab 32768, top_p 0.95, float32 and bfloat16, 3 repeats; at this
      # vocabulary vLLM's CPU top-p sort dominates: about 50 CPU s a call, 40 minutes on 2 busy cores
  python benchmarks/sampling_seeds.py --vocab 0 --top_p 1.0 --repeats 5 \\
      --json benchmarks/results/sampling_seeds_cpu_small_vocab.json
      # the worst case: no top-p sort, and the tiny tokenizer's 265-token vocabulary
  python benchmarks/sampling_seeds.py --tiny   # 4 prompts x 4 x 8 tokens, float32, 1 repeat: the test
"""

import gc
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

import numpy as np  # noqa: E402

from benchmarks.common import Table, add_output_flags, check_head_size, in_turn, machine, parser, write_json  # noqa: E402
from nanorlhf.engine import RolloutEngine, completion_seeds  # noqa: E402  (sets vLLM's in-process environment first)

VARIANTS = ("seeded", "unseeded", "unseeded_n1")


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=32, help="prompts per call")
    p.add_argument("--group_size", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt_tokens", type=int, default=32, help="prompt length")
    p.add_argument("--max_new_tokens", type=int, default=32, help="tokens generated per completion (EOS ignored)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (GRPO's default)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling (GRPO's default)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated engine dtypes, one engine each")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size (head size 64)")
    p.add_argument("--layers", type=int, default=2, help="model decoder layers")
    p.add_argument("--vocab", type=int, default=32768, help="model vocabulary (0: the tiny tokenizer's)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant and dtype (alternating)")
    p.add_argument("--seed", type=int, default=0)
    add_output_flags(p, tiny="4 prompts x 4 x 8 tokens, the tokenizer's vocab, float32, 1 repeat: the test")
    args = p.parse_args(argv)
    if args.tiny:
        args.prompts, args.group_size, args.prompt_tokens, args.max_new_tokens = 4, 4, 8, 8
        args.hidden, args.layers, args.vocab, args.dtypes, args.repeats = 128, 2, 0, "float32", 1
    check_head_size(p, args.hidden)
    return args


def build_model(out_dir, args):
    """The tiny policy at --hidden/--layers, its vocabulary widened to --vocab (new random weights)."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    from nanorlhf.tiny import build_tiny_policy

    texts = [f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)]
    build_tiny_policy(out_dir, texts, hidden_size=args.hidden, num_layers=args.layers,
                      max_positions=args.prompt_tokens + args.max_new_tokens, seed=args.seed)
    config = AutoConfig.from_pretrained(out_dir)
    tokenizer_vocab = config.vocab_size
    if args.vocab > config.vocab_size:
        config.vocab_size = args.vocab
        torch.manual_seed(args.seed)
        Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return tokenizer_vocab


def requests(variant, prompts, args):
    """(prompt dicts, SamplingParams list) of one call: prompts x group_size completions."""
    from vllm import SamplingParams

    common = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, logprobs=0,
                  ignore_eos=True, detokenize=False)
    g = args.group_size
    if variant == "unseeded":
        return [{"prompt_token_ids": p} for p in prompts], [SamplingParams(n=g, **common) for _ in prompts]
    seeds = completion_seeds(args.seed, len(prompts) * g)  # as the engine draws them
    params = [SamplingParams(n=1, seed=seeds[i] if variant == "seeded" else None, **common)
              for i in range(len(prompts) * g)]
    return [{"prompt_token_ids": p} for p in prompts for _ in range(g)], params


def timed_call(llm, variant, prompts, args):
    """(wall seconds, CPU seconds of this process, generated tokens, the completions' token ids, prompt-major)."""
    inputs, params = requests(variant, prompts, args)
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    completions = [list(c.token_ids) for out in outputs for c in out.outputs]
    return wall, cpu, sum(map(len, completions)), completions


def seed_draw_seconds(batch, repeats=200):
    """CPU seconds of the only work seeded requests add to vLLM's CPU sampler per sampling step of `batch` requests
    (`forward_cpu` in vllm/v1/sample/ops/topk_topp_sampler.py, replicated: vLLM's compiled ops cannot be called
    outside an engine): one draw from each request's own torch.Generator, in a Python loop, instead of one batched
    draw. Median over `repeats`, one thread."""
    import torch

    generators = {i: torch.Generator().manual_seed(i) for i in range(batch)}

    def draw(generators):
        seeds = torch.randint(0, 2**31, (batch,), dtype=torch.long)
        for i, generator in generators.items():
            seeds[i] = torch.randint(0, 2**31, (1,), generator=generator, dtype=torch.long).item()
        return seeds

    times = {"seeded": [], "unseeded": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(repeats):
        for name, gens in (("seeded", generators), ("unseeded", {})):
            start = time.process_time()
            draw(gens)
            times[name].append(time.process_time() - start)
    torch.set_num_threads(threads)
    return statistics.median(times["seeded"]) - statistics.median(times["unseeded"])


def main(args):
    workdir = tempfile.mkdtemp(prefix="sampling_seeds-")
    tokenizer_vocab = build_model(workdir, args)
    rng = np.random.default_rng(args.seed + 1)
    prompts = [rng.integers(3, tokenizer_vocab, size=args.prompt_tokens).tolist() for _ in range(args.prompts)]
    n_completions = args.prompts * args.group_size
    print(f"requests: {args.prompts} prompts x {args.group_size} completions x {args.max_new_tokens} tokens "
          f"(EOS ignored), prompt {args.prompt_tokens} tokens, temperature {args.temperature}, top_p {args.top_p}")
    print(f"model: random Qwen2, hidden {args.hidden}, {args.layers} layers, vocab {max(args.vocab, tokenizer_vocab)}",
          flush=True)

    rows = []
    for dtype in args.dtypes.split(","):
        engine = RolloutEngine(workdir, args.prompt_tokens + args.max_new_tokens, dtype, seed=args.seed)
        for variant in VARIANTS:  # warm-up: vLLM's first calls pay for compilation and allocation
            timed_call(engine.llm, variant, prompts, args)
        seconds, cpu_seconds, tokens, outputs = ({v: [] for v in VARIANTS} for _ in range(4))
        for repeat in range(args.repeats):
            order = in_turn(VARIANTS, repeat)
            for variant in order:
                wall, cpu, n_tokens, completions = timed_call(engine.llm, variant, prompts, args)
                seconds[variant].append(wall)
                cpu_seconds[variant].append(cpu)
                tokens[variant].append(n_tokens)
                outputs[variant].append(completions)
            print(f"  {dtype} repeat {repeat + 1} (wall s / CPU s): "
                  + ", ".join(f"{v} {seconds[v][-1]:.2f}/{cpu_seconds[v][-1]:.2f}" for v in order), flush=True)
        row = {"dtype": dtype, "completions": n_completions}
        for v in VARIANTS:
            row[f"{v}_seconds"] = statistics.median(seconds[v])
            row[f"{v}_cpu_seconds"] = statistics.median(cpu_seconds[v])
            row[f"{v}_tokens_per_second"] = statistics.median(t / s for t, s in zip(tokens[v], seconds[v]))
            row[f"{v}_tokens_per_cpu_second"] = statistics.median(t / s for t, s in zip(tokens[v], cpu_seconds[v]))
            row[f"{v}_all_seconds"] = [round(s, 4) for s in seconds[v]]
            row[f"{v}_all_cpu_seconds"] = [round(s, 4) for s in cpu_seconds[v]]
            row[f"{v}_tokens"] = tokens[v][0]
            # the same completions on every repeat? (needs 2 repeats; seeds should make it so)
            row[f"{v}_repeats_identical"] = (all(o == outputs[v][0] for o in outputs[v][1:])
                                             if args.repeats > 1 else None)
        for other in VARIANTS[1:]:
            for kind in ("tokens_per_second", "tokens_per_cpu_second"):
                row[f"seeded/{other} {kind}"] = row[f"seeded_{kind}"] / row[f"{other}_{kind}"]
        rows.append(row)
        del engine.llm  # the next dtype's engine takes the memory
        gc.collect()

    print()
    table = Table(("dtype", "<9"), ("variant", "<12"), ("wall s", ">8.2f"), ("CPU s", ">8.2f"), ("tokens/s", ">9.0f"),
                  ("tokens/CPU s", ">12.0f"), ("seeded/this wall", ">16.3f"), ("seeded/this CPU", ">15.3f"),
                  ("same on rerun", ">13"))
    table.print_header()
    for row in rows:
        for v in VARIANTS:
            same = row[f"{v}_repeats_identical"]
            table.print_row(row["dtype"], v, row[f"{v}_seconds"], row[f"{v}_cpu_seconds"],
                            row[f"{v}_tokens_per_second"], row[f"{v}_tokens_per_cpu_second"],
                            row["seeded_tokens_per_second"] / row[f"{v}_tokens_per_second"],
                            row["seeded_tokens_per_cpu_second"] / row[f"{v}_tokens_per_cpu_second"],
                            None if same is None else "yes" if same else "no")
    print("seeded/this: throughput of the seeded requests over this variant's (below 1: the seeds cost time)")
    n_requests = args.prompts * args.group_size
    loop_seconds = seed_draw_seconds(n_requests)
    for row in rows:  # every completion token is one sampling step of the whole batch (all run together)
        row["seed_draw_ms_per_step"] = loop_seconds * 1e3
        row["seed_draw_share_of_seeded_cpu"] = loop_seconds * args.max_new_tokens / row["seeded_cpu_seconds"]
    print(f"the seeds' own work in vLLM's CPU sampler: {loop_seconds * 1e3:.2f} ms per sampling step of {n_requests} "
          "requests (one draw per request from its generator); x " + str(args.max_new_tokens) + " steps = "
          + ", ".join(f"{r['seed_draw_share_of_seeded_cpu']:.2%} of the seeded call's CPU time ({r['dtype']})"
                      for r in rows))

    if args.json:
        import torch

        write_json(args.json, {**machine("cpu", torch.get_num_threads()), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main(parse_args())

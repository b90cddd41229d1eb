"""What the loop around vLLM costs during generation: the rollout engine's generate against vLLM alone.

Three calls on the same engine (`nanorlhf.engine.RolloutEngine`, the run's settings), the same prompts and shapes,
taking turns (the order rotates every round, after one warm-up round), each after a prefix-cache reset as after a
weight push:
- engine:       `RolloutEngine.generate`, what every step calls: one request per completion with its own seed,
                the sampled tokens' log-probs, the results turned into `Completion`s.
- vllm_seeded:  the very same requests straight into `LLM.generate`: the engine's own Python around vLLM.
- vllm:         vLLM alone the plain way: one request per prompt with n = group size, no seeds, no log-probs.
Completions stop at EOS or the limit, so lengths may differ a little between `vllm` and the others (the seeded
two draw identical tokens); generated tokens per second is the fair measure, and its ratio engine/other is the
loop's cost (1.0 = none). A random model with a 32k vocabulary almost never ends early.

  python benchmarks/generation_overhead.py --json benchmarks/results/generation_overhead_cpu.json
"""

import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import Table, add_output_flags, in_turn, parser, write_json  # noqa: E402
from nanorlhf.engine import RolloutEngine, completion_seeds  # noqa: E402  (sets vLLM's in-process environment first)
from nanorlhf.tiny import build_policy_at_shape  # noqa: E402

VARIANTS = ("engine", "vllm_seeded", "vllm")


def parse_args():
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    add_output_flags(p, tiny="hidden 128, 2 layers, 16 tokens, one round: the test")
    args = p.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.vocab, args.max_new_tokens, args.rounds = 128, 2, 4096, 16, 1
    return args


def call(engine, variant, prompts, args, seed):
    """Generated tokens of one call of `variant`."""
    from vllm import SamplingParams

    engine.llm.reset_prefix_cache()  # as after a weight push
    if variant == "engine":
        return sum(len(c.token_ids) for c in engine.generate(prompts, args.group_size, seed, args.max_new_tokens))
    if variant == "vllm_seeded":  # RolloutEngine.generate's requests, without anything around them
        seeds = completion_seeds(seed, len(prompts) * args.group_size)
        params = [SamplingParams(n=1, max_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=s, logprobs=0)
                  for s in seeds]
        inputs = [{"prompt_token_ids": p} for p in prompts for _ in range(args.group_size)]
    else:
        params = SamplingParams(n=args.group_size, max_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
        inputs = [{"prompt_token_ids": p} for p in prompts]
    outputs = engine.llm.generate(inputs, params, use_tqdm=False)
    return sum(len(o.token_ids) for out in outputs for o in out.outputs)


def main():
    args = parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        path = build_policy_at_shape(folder, hidden_size=args.hidden, num_layers=args.layers, vocab_size=args.vocab)
        prompts = [[rng.randrange(3, args.vocab - 3) for _ in range(rng.randint(20, 60))] for _ in range(args.prompts)]
        engine = RolloutEngine(path, 64 + args.max_new_tokens, args.dtype, seed=0)
        rates = {v: [] for v in VARIANTS}
        for round_ in range(args.rounds + 1):
            for variant in in_turn(VARIANTS, round_):
                start = time.perf_counter()
                tokens = call(engine, variant, prompts, args, seed=round_)
                if round_ > 0:
                    rates[variant].append(tokens / (time.perf_counter() - start))
    results = {"args": vars(args), "tokens_per_second": rates,
               "median_tokens_per_second": {v: statistics.median(r) for v, r in rates.items()}}
    median = results["median_tokens_per_second"]
    results["engine_over"] = {v: median["engine"] / median[v] for v in VARIANTS[1:]}
    print(f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}: {args.prompts} prompts x "
          f"{args.group_size} completions x up to {args.max_new_tokens} tokens, {args.rounds} rounds")
    table = Table(("variant", "<12"), ("tokens/s", ">8.1f"), ("engine / this", ">13.3f"))
    table.print_header()
    for v in VARIANTS:
        table.print_row(v, median[v], results["engine_over"].get(v))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()

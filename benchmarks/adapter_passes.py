"""The three passes of a training step with a LoRA adapter, timed side by side on one model: the reference (adapter
off, no grad), the old log-probs (adapter on, no grad, no dropout) and the train pass (forward with dropout and
gradient checkpointing, backward), as ratios to the reference (issue 27: at most 1.3x and 5x).

Variants, in turn in each round: `fused` (nanorlhf/lora.py as it is), `peft` (peft's own LoRA layers), and with
`--baseline_lora FILE` a LoraLinearFunction from another lora.py, e.g. a previous commit's:

    git show 52f9837:nanorlhf/lora.py > /tmp/lora_fp32_adapter.py
    python benchmarks/adapter_passes.py --baseline_lora /tmp/lora_fp32_adapter.py --json benchmarks/results/x.json

Random token ids (the passes' cost does not depend on them); the adapter's B drawn small and nonzero.
"""

import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script
from benchmarks.common import Table, add_output_flags, in_turn, machine, parser, settings, write_json  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model name nanorlhf resolves, or a folder")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--sequences", type=int, default=16, help="sequences in the micro-batch")
    p.add_argument("--prompt_tokens", type=int, default=60)
    p.add_argument("--completion_tokens", type=int, default=96)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--baseline_lora", default="", help="a lora.py whose LoraLinearFunction is timed as `baseline`")
    add_output_flags(p, tiny="the demo model, 2 sequences of 8 + 8 tokens, one round: the test")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.sequences, args.prompt_tokens, args.completion_tokens, args.rounds = \
            "demo:addition", 2, 8, 8, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    import nanorlhf.lora as lora
    from nanorlhf.logprobs import completion_logprobs
    from nanorlhf.policy import evaluating, load_policy
    from nanorlhf.tasks import resolve

    torch.manual_seed(0)
    policy = load_policy(resolve(args.model), args.lora_r, args.lora_alpha, args.lora_dropout, "all-linear",
                         args.dtype, gradient_checkpointing=True)
    for _, module in policy.named_modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.01)
    vocab = policy.config.vocab_size
    prompts = [torch.randint(100, vocab, (args.prompt_tokens,)).tolist() for _ in range(args.sequences)]
    completions = [torch.randint(100, vocab, (args.completion_tokens,)).tolist() for _ in range(args.sequences)]
    pad_id = 0

    functions = {"fused": lora.LoraLinearFunction}
    if args.baseline_lora:
        spec = importlib.util.spec_from_file_location("baseline_lora", args.baseline_lora)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        functions["baseline"] = baseline.LoraLinearFunction

    def use(variant):
        lora.fuse_lora_layers(policy, variant != "peft")
        lora.LoraLinearFunction = functions.get(variant, functions["fused"])

    def reference():
        with torch.no_grad(), policy.disable_adapter(), evaluating(policy):
            completion_logprobs(policy, prompts, completions, pad_id, entropy=False)

    def old_logprobs():
        with torch.no_grad(), evaluating(policy):
            completion_logprobs(policy, prompts, completions, pad_id, entropy=False)

    def train():
        out = completion_logprobs(policy, prompts, completions, pad_id)
        ((out["logprobs"] + 0.01 * out["entropy"]) * out["mask"]).sum().backward()
        policy.zero_grad(set_to_none=True)

    variants = ["peft", *functions]
    passes = [("reference", reference, None)] + [(f"{name} {v}", fn, v) for v in variants
                                                 for name, fn in (("old_logprobs", old_logprobs), ("train", train))]
    seconds = {name: [] for name, _, _ in passes}
    for round_ in range(args.rounds + 1):
        for name, fn, variant in in_turn(passes, round_):
            use(variant or "fused")
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up
                seconds[name].append(time.perf_counter() - start)
    use("fused")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    table = Table(("pass", "<22"), ("median s", ">9.2f"), ("x reference", ">12.2f"), ("rounds", ""))
    table.print_header()
    for name in seconds:
        table.print_row(name, median[name], median[name] / median["reference"],
                        " ".join(f"{s:.2f}" for s in seconds[name]))
    if args.json:
        write_json(args.json, {**machine("cpu", torch.get_num_threads()),
                               "settings": {**settings(args, ("json", "baseline_lora")),
                                            "baseline_lora": os.path.basename(args.baseline_lora)},
                               "seconds": seconds, "median": median,
                               "x_reference": {k: v / median["reference"] for k, v in median.items()}})


if __name__ == "__main__":
    main()

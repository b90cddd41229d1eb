"""Activation memory that backward keeps: peft's LoRA layers against nanorlhf/lora.py's one-function layer.

One training forward (completion_logprobs with gradients) of a random Qwen2 with the user's LoRA (r 64 on every
linear layer, alpha 16), without gradient checkpointing, so that every layer's saved tensors are alive at once:
each tensor autograd saves for backward is counted once by its storage (torch.autograd.graph.saved_tensors_hooks),
the model's weights left out. A byte count, not a timing: the same on any machine. Under checkpointing the model keeps only
each layer's input, and one layer's share of these bytes is alive while that layer is recomputed in backward.

  python benchmarks/lora_saved_memory.py --json benchmarks/results/lora_saved_memory.json
  python benchmarks/lora_saved_memory.py --tiny      # seconds: what tests/test_benchmarks.py runs
"""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from benchmarks.common import Table, add_output_flags, parser, write_json  # noqa: E402
from nanorlhf.logprobs import completion_logprobs  # noqa: E402
from nanorlhf.lora import fuse_lora_layers  # noqa: E402
from nanorlhf.policy import load_policy  # noqa: E402
from nanorlhf.tiny import build_policy_at_shape  # noqa: E402


def saved_bytes(model, prompts, completions):
    """Bytes of the distinct storages autograd saves during one forward with gradients, the model's own weights
    (in memory anyway) left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        completion_logprobs(model, prompts, completions, pad_id=0)
    return sum(storages.values())


def main():
    p = parser(__doc__)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="completion tokens per sequence (prompts: 32)")
    add_output_flags(p, tiny="hidden 128, 2 layers, 2 sequences of 16 tokens")
    args = p.parse_args()
    shape = dict(hidden_size=128, num_layers=2, vocab_size=512) if args.tiny else dict(hidden_size=512, num_layers=4)
    if args.tiny:
        args.sequences, args.tokens = 2, 16
    prompts = [[3 + i] * 32 for i in range(args.sequences)]
    completions = [[100 + i] * args.tokens for i in range(args.sequences)]
    results = {"args": vars(args), "shape": shape, "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        path = build_policy_at_shape(folder, **shape)
        table = Table(("dtype", "<9"), ("dropout", ">7"), ("peft MiB", ">9.1f"), ("fused MiB", ">9.1f"),
                      ("fused/peft", ">10.2f"))
        table.print_header()
        for dtype in ("bfloat16", "float32"):
            for dropout in (0.0, 0.05):
                model = load_policy(path, 64, 16, dropout, "all-linear", dtype, gradient_checkpointing=False)
                row = {"dtype": dtype, "lora_dropout": dropout}
                for fused in (False, True):
                    fuse_lora_layers(model, fused)
                    row["fused_bytes" if fused else "peft_bytes"] = saved_bytes(model, prompts, completions)
                row["ratio"] = row["fused_bytes"] / row["peft_bytes"]
                results["rows"].append(row)
                table.print_row(dtype, dropout, row["peft_bytes"] / 2**20, row["fused_bytes"] / 2**20, row["ratio"])
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()

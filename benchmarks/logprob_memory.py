"""Peak memory of per-token log-probs: chunked `completion_logprobs` against the plain full-logits computation.

What is compared, on one sequence (batch 1) of `--prompt_tokens` + `--tokens` completion tokens:
- plain:   `model(input_ids).logits` (B, T, vocab) -> completion slice -> .float() -> log_softmax -> gather
- chunked: `nanorlhf.logprobs.completion_logprobs`: only the hidden states of completion positions reach
           the LM head, which runs with log_softmax in chunks of `--chunk_tokens`, checkpointed under grad.
Two modes: `no_grad` (forward only: reference / old-policy log-probs) and `train` (forward with grad, then
backward of their sum: what a policy-gradient loss does). The model is frozen, as under LoRA, so the gradient
flows only into the hidden states.

How the LOG-PROB part alone is measured: the model has Qwen2.5's vocabulary and hidden size but few layers
(`--layers`, default 1, so it fits and runs on a CPU). Its backbone runs once beforehand; its output is then
replayed (the decoder returns the stored hidden states, as a leaf that collects the gradient), so both variants
run their real code while the measured region holds only the LM head, log-softmax, gather and backward. The
backbone's own activations are the same for both variants and grow with depth; they are left out on purpose.
- cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() at the start.
- cpu:  peak resident set size above the RSS at the start. Linux lets a process reset its peak RSS (write "5" to
  /proc/self/clear_refs, then read VmHWM), so every measurement runs in this one process. glibc's mmap threshold
  is pinned at 128 KiB so that every large tensor is its own mapping, returned to the OS when freed; RSS then
  follows the live tensors instead of what malloc keeps cached.
The log-probs (and in `train` the hidden-state gradients) of both variants are compared: max |difference|.

Commands (results: benchmarks/results/logprob_memory_cpu.json, docs/img/logprob_memory.png):
  python benchmarks/logprob_memory.py --tokens 2048,8192 --json benchmarks/results/logprob_memory_cpu.json \
      --plot docs/img/logprob_memory.png            # CPU, 1 layer, about 15 minutes on 2 busy cores, 15 GiB RAM
  python benchmarks/logprob_memory.py --tokens 2048 --chunk_tokens 128   # smaller chunks: lower floor
  python benchmarks/logprob_memory.py --device cuda --layers 28 --tokens 2048,8192,16384
  python benchmarks/logprob_memory.py --tiny        # seconds: what tests/test_benchmarks.py runs
"""

import ctypes
import gc
import os
import re
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPast  # noqa: E402

from benchmarks.common import Table, add_output_flags, parser, settings, write_json  # noqa: E402
from nanorlhf.logprobs import completion_logprobs  # noqa: E402
from nanorlhf.tracking import new_figure, save_figure  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--tokens", default="2048,8192", help="completion lengths to measure, comma-separated")
    p.add_argument("--prompt_tokens", type=int, default=128, help="prompt length in front of each completion")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (Qwen2.5-1.5B)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers (only produce the hidden states)")
    p.add_argument("--chunk_tokens", type=int, default=128, help="completion_logprobs chunk size (its default)")
    p.add_argument("--modes", default="no_grad,train", help="no_grad and/or train (forward with grad + backward)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="model dtype (the training dtype)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    add_output_flags(p, tiny="small vocab/hidden/tokens: runs in seconds (tests)", plot="write a PNG bar chart here")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.hidden, args.layers, args.tokens = 2000, 64, 1, "256,512"
        args.prompt_tokens, args.chunk_tokens = 16, 64
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.modes = args.modes.split(",")
    if not set(args.modes) <= {"no_grad", "train"}:
        p.error(f"--modes takes no_grad and/or train, got {','.join(args.modes)}")
    if args.device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        p.error("--device cpu measures peak RSS through /proc/self/clear_refs, which only Linux has; use --device cuda")
    return args


class PeakMemory:
    """Peak memory in MiB above what was in use when the `with` block started (see the module docstring)."""

    def __init__(self, device):
        self.device = device
        if device == "cpu":
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed tensors leave the RSS at once

    def _status_bytes(self, field):  # VmRSS / VmHWM, reported in kB
        return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS (VmHWM) := current RSS
            self.start = self._status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = self._status_bytes("VmHWM")
        self.mib = (peak - self.start) / 2**20


def build_model(args):
    """Qwen2.5-1.5B's layer shapes (12 heads, 2 KV heads, 8960 MLP at hidden 1536; scaled with --hidden),
    tied embeddings, random weights, frozen as the base model under LoRA is."""
    torch.manual_seed(0)
    heads = max(1, args.hidden // 128)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=2 if heads % 2 == 0 else 1,
                         intermediate_size=8960 * args.hidden // 1536, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(args.device, DTYPES[args.dtype]).eval()
    return model.requires_grad_(False)


@contextmanager
def replayed_backbone(model, hidden):
    """Inside the block the decoder returns `hidden` instead of running its layers (see the module docstring)."""
    model.model.forward = lambda *args, **kwargs: BaseModelOutputWithPast(last_hidden_state=hidden)
    try:
        yield
    finally:
        del model.model.forward  # back to the class's forward


def plain_logprobs(model, input_ids, prompt_tokens, chunk_tokens):
    logits = model(input_ids=input_ids).logits  # (1, T, vocab) in the model dtype
    logprobs = logits[:, prompt_tokens - 1 : -1].float().log_softmax(-1)  # (1, C, vocab) fp32
    return logprobs.gather(-1, input_ids[:, prompt_tokens:, None])[..., 0]  # (1, C)


def chunked_logprobs(model, input_ids, prompt_tokens, chunk_tokens):
    ids = input_ids[0].tolist()
    out = completion_logprobs(model, [ids[:prompt_tokens]], [ids[prompt_tokens:]], pad_id=0, chunk_tokens=chunk_tokens)
    return out["logprobs"]  # (1, C)


def measure(variant, model, hidden, input_ids, mode, args):
    leaf = hidden.detach().requires_grad_(mode == "train")
    start = time.perf_counter()
    with replayed_backbone(model, leaf), torch.set_grad_enabled(mode == "train"), PeakMemory(args.device) as memory:
        logprobs = variant(model, input_ids, args.prompt_tokens, args.chunk_tokens)
        if mode == "train":
            logprobs.sum().backward()  # a policy-gradient loss is a weighted sum of these log-probs
    return {"mib": memory.mib, "seconds": time.perf_counter() - start, "logprobs": logprobs.detach().float(),
            "grad": leaf.grad.float() if leaf.grad is not None else None}


def plot(rows, path):
    labels = [f"{r['tokens']} tokens\n{r['mode']}" for r in rows]
    x = range(len(rows))
    fig, ax = new_figure(figsize=(1.8 * len(rows) + 2, 4))
    ax.bar([i - 0.2 for i in x], [r["plain_mib"] for r in rows], 0.4, label="plain: full logits")
    ax.bar([i + 0.2 for i in x], [r["chunked_mib"] for r in rows], 0.4, label="chunked: completion_logprobs")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ratio']:.1f}x", (i, r["plain_mib"]), ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("peak memory of the log-prob part (MiB)")
    ax.set_title(f"per-token log-probs, vocab {rows[0]['vocab']}, hidden {rows[0]['hidden']}, batch 1")
    ax.legend()
    save_figure(fig, path)


def sequence(model, tokens, args):
    """Random prompt + completion ids (1, T) and the backbone's hidden states for them (1, T, hidden)."""
    generator = torch.Generator().manual_seed(tokens)
    input_ids = torch.randint(args.vocab, (1, args.prompt_tokens + tokens), generator=generator).to(args.device)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids).last_hidden_state
    return input_ids, hidden


def compare(model, input_ids, hidden, mode, args):
    plain = measure(plain_logprobs, model, hidden, input_ids, mode, args)
    chunked = measure(chunked_logprobs, model, hidden, input_ids, mode, args)
    grad_diff = (plain["grad"] - chunked["grad"]).abs().max().item() if mode == "train" else None
    return {"tokens": input_ids.shape[1] - args.prompt_tokens, "mode": mode, "plain_mib": plain["mib"],
            "chunked_mib": chunked["mib"], "ratio": plain["mib"] / max(chunked["mib"], 1e-9),
            "max_abs_diff": (plain["logprobs"] - chunked["logprobs"]).abs().max().item(),
            "grad_max_abs_diff": grad_diff, "plain_seconds": plain["seconds"], "chunked_seconds": chunked["seconds"],
            "vocab": args.vocab, "hidden": args.hidden}


def main(argv=None):
    args = parse_args(argv)
    method = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM reset via clear_refs)"
    print(f"model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layer(s) (backbone run once, not measured), "
          f"{args.dtype}, batch 1, prompt {args.prompt_tokens} tokens, chunk {args.chunk_tokens} tokens; "
          f"device {args.device}; memory = {method}, above what was in use before")
    model = build_model(args)
    # The first calls allocate once-only buffers (autograd engine, kernel caches): a short warm-up keeps them
    # out of the first measured row.
    for mode in args.modes:
        compare(model, *sequence(model, 64, args), mode, args)
    table = Table(("tokens", ">7"), ("mode", ">8"), ("plain MiB", ">10.1f"), ("chunked MiB", ">12.1f"),
                  ("plain/chunked", ">14"), ("max|diff|", ">10.2e"), ("grad max|diff|", ">15.2e"))
    table.print_header()
    rows = []
    for tokens in args.tokens:
        input_ids, hidden = sequence(model, tokens, args)
        for mode in args.modes:
            row = compare(model, input_ids, hidden, mode, args)
            rows.append(row)
            table.print_row(tokens, mode, row["plain_mib"], row["chunked_mib"], f"{row['ratio']:.1f}x",
                            row["max_abs_diff"], row["grad_max_abs_diff"])
        del input_ids, hidden
    if args.json:
        write_json(args.json, {"config": settings(args), "memory_method": method, "rows": rows})
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

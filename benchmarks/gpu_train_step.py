"""The training phase of one RLHF step at Qwen2.5-1.5B's real shape: tokens/s, MFU and peak GPU memory.

One step = log-probs of the completion tokens under the LoRA policy -> policy-gradient loss
-(advantage * log-prob) averaged over completion tokens -> backward -> AdamW step on the LoRA weights.
The model is Qwen2.5-1.5B's architecture built from its public config values (hidden 1536, 28 layers, 12 heads,
2 KV heads, MLP 8960, vocab 151936, tied embeddings, rope theta 1e6) with random weights in bf16, and a peft
LoRA adapter (r 64, alpha 16, all linear layers), as nanorlhf.policy.load_policy builds it. Nothing is
downloaded. Each completion length gets a 2x2 grid:
- log-probs plain (`model(...).logits` -> float -> log_softmax -> gather) or chunked
  (`nanorlhf.logprobs.completion_logprobs`: LM head + log_softmax over completion positions only, in chunks
  checkpointed under grad)
- gradient checkpointing of the decoder layers off or on.
A cell that runs out of GPU memory is reported as OOM; the others still run.

Measured per cell: 1 warm-up step, then `--steps` timed steps (CUDA synchronised around them).
- tokens/s = batch_size * (prompt + completion tokens) / seconds per step
- model FLOPs per step = batch_size * (4*N*T + 6*N_lora*T + 6*L*h*T^2), T = prompt + completion tokens:
  the frozen base (N = weights of every linear layer + the LM head) costs 2NT forward + 2NT backward (gradients
  flow through it to the activations, but it gets no weight gradient: the usual 6NT of full fine-tuning would
  overstate the work by half); the LoRA matrices (N_lora) get the full 6 N_lora T; causal attention costs
  2*L*h*T^2 forward and twice that backward. Recomputation by checkpointing is not counted (it is overhead).
- MFU = model FLOPs per second / `--peak_tflops` (H100 SXM dense bf16: 989 TFLOPS).
- peak memory = torch.cuda.max_memory_allocated() over the cell (weights + LoRA + AdamW state + activations).

Needs only torch, transformers, peft and accelerate (the GPU test machine has no vllm, trl or datasets).
Commands:
  python benchmarks/gpu_train_step.py --json benchmarks/results/gpu_train_step_h100.json   # H100, default grid
  python benchmarks/gpu_train_step.py --batch_size 4 --completion_tokens 1500               # more tokens per step
  python benchmarks/gpu_train_step.py --device cpu --tiny   # seconds on a CPU: what tests/test_benchmarks.py runs
"""

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from benchmarks.common import Table, add_output_flags, parser, settings, write_json  # noqa: E402  (standard library)
from nanorlhf.logprobs import completion_logprobs  # noqa: E402  (imports only torch: no vllm needed)
from nanorlhf.lora import fuse_lora_layers  # noqa: E402  (torch and peft)

QWEN25_1P5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                   tie_word_embeddings=True, rope_theta=1000000.0)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=256, vocab_size=1000, max_position_embeddings=1024, tie_word_embeddings=True)


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--completion_tokens", default="1500,8000", help="completion lengths, comma-separated")
    p.add_argument("--prompt_tokens", type=int, default=200, help="prompt length in front of each completion")
    p.add_argument("--batch_size", type=int, default=1, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell, after 1 warm-up step")
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-6)
    p.add_argument("--chunk_tokens", type=int, default=128, help="completion_logprobs chunk size (its default)")
    p.add_argument("--peak_tflops", type=float, help="the card's dense bf16 peak; default 989 (H100 SXM) on cuda")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--peft_lora", action="store_true", help="peft's own LoRA layers (what gpu_train_step_h100.json "
                   "measured) instead of nanorlhf/lora.py's one-function layers, which load_policy uses since 2026-12-04")
    add_output_flags(p, tiny="hidden 128, 2 layers, vocab 1000, 64/128 tokens, 1 step")
    args = p.parse_args(argv)
    args.shape = TINY if args.tiny else QWEN25_1P5B
    if args.tiny:
        args.completion_tokens, args.prompt_tokens, args.steps, args.chunk_tokens = "64,128", 16, 1, 32
    args.completion_tokens = [int(t) for t in args.completion_tokens.split(",")]
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU; use --device cpu (with --tiny for a quick run)")
    return args


def build_policy(args):
    """Random-weight base in bf16 (built directly on the device) + a trainable LoRA adapter on all linear layers."""
    torch.manual_seed(0)
    config = Qwen2Config(**args.shape, use_cache=False)  # training never needs a KV cache
    with torch.device(args.device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    policy = get_peft_model(model, lora).train()
    fuse_lora_layers(policy, fused=not args.peft_lora)
    return policy


def model_flops_per_step(args, lora_params, tokens):
    """4*N*T + 6*N_lora*T + 6*L*h*T^2 per sequence (module docstring)."""
    s = args.shape
    h, kv = s["hidden_size"], s["hidden_size"] // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * s["intermediate_size"]  # q, o; k, v; gate, up, down
    n_base = s["num_hidden_layers"] * per_layer + h * s["vocab_size"]  # + LM head
    attention = 6 * s["num_hidden_layers"] * h * tokens**2
    return args.batch_size * (4 * n_base * tokens + 6 * lora_params * tokens + attention)


def plain_logprobs(model, prompts, completions):
    input_ids = torch.tensor([p + c for p, c in zip(prompts, completions)], device=model.device)  # (B, T), no padding
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits  # (B, T, vocab) bf16
    start = len(prompts[0])
    logprobs = logits[:, start - 1 : -1].float().log_softmax(-1)  # (B, C, vocab) fp32
    return logprobs.gather(-1, input_ids[:, start:, None])[..., 0]  # (B, C)


def train_step(model, optimizer, prompts, completions, advantages, chunked, args):
    if chunked:
        out = completion_logprobs(model, prompts, completions, pad_id=0, chunk_tokens=args.chunk_tokens)
        logprobs = out["logprobs"]  # (B, C); no padding: every completion in a cell has the same length
    else:
        logprobs = plain_logprobs(model, prompts, completions)
    loss = -(advantages[:, None] * logprobs).mean()  # REINFORCE-style, every completion token counts once
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_cell(model, completion_tokens, chunked, checkpointing, args):
    """1 warm-up + `--steps` timed steps with a fresh AdamW; returns seconds per step and peak memory."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    generator = torch.Generator().manual_seed(completion_tokens)
    vocab = args.shape["vocab_size"]
    prompts = torch.randint(vocab, (args.batch_size, args.prompt_tokens), generator=generator).tolist()
    completions = torch.randint(vocab, (args.batch_size, completion_tokens), generator=generator).tolist()
    advantages = torch.randn(args.batch_size, generator=generator).to(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, prompts, completions, advantages, chunked, args)  # warm-up: kernels, Adam state
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, prompts, completions, advantages, chunked, args)
    synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return seconds, peak_gib


def main(argv=None):
    args = parse_args(argv)
    model = build_policy(args)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    s = args.shape
    print(f"model: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, vocab {s['vocab_size']}, bf16, random "
          f"weights; LoRA r {args.lora_r} alpha {args.lora_alpha} all-linear ({lora_params / 1e6:.1f}M trainable); "
          f"batch {args.batch_size} x (prompt {args.prompt_tokens} + completion); device {device_name}; "
          f"torch {torch.__version__}")
    print("model FLOPs/step = batch * (4*N*T + 6*N_lora*T + 6*L*h*T^2), T = prompt + completion; "
          f"MFU against {args.peak_tflops or '-'} TFLOPS; {args.steps} timed step(s) after 1 warm-up")
    table = Table(("completion", ">10"), ("log-probs", ">9"), ("grad ckpt", ">9"), ("tokens/s", ">9.0f"),
                  ("s/step", ">7.2f"), ("TFLOPS", ">7.1f"), ("MFU", ">6.1%"), ("peak GiB", ">8.1f"))
    table.print_header()
    rows = []
    for completion_tokens in args.completion_tokens:
        tokens = args.prompt_tokens + completion_tokens
        for chunked in (False, True):
            for checkpointing in (False, True):
                row = {"completion_tokens": completion_tokens, "prompt_tokens": args.prompt_tokens,
                       "batch_size": args.batch_size, "chunked_logprobs": chunked,
                       "gradient_checkpointing": checkpointing}
                try:
                    seconds, peak_gib = run_cell(model, completion_tokens, chunked, checkpointing, args)
                except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError
                    seconds = peak_gib = None
                # whatever the cell left (gradients, Adam state, or a failed step's activations) is freed here
                model.zero_grad(set_to_none=True)
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                cell = (completion_tokens, "chunked" if chunked else "plain", "on" if checkpointing else "off")
                if seconds is None:
                    row["oom"] = True
                    table.print_row(*cell, *["OOM"] * 5)
                else:
                    tflops = model_flops_per_step(args, lora_params, tokens) / seconds / 1e12
                    mfu = tflops / args.peak_tflops if args.peak_tflops else None
                    row.update(oom=False, seconds_per_step=seconds, tflops=tflops, mfu=mfu, peak_memory_gib=peak_gib,
                               tokens_per_second=args.batch_size * tokens / seconds)
                    table.print_row(*cell, row["tokens_per_second"], seconds, tflops, mfu, peak_gib)
                rows.append(row)
    if args.json:
        write_json(args.json, {"config": settings(args), "device": device_name, "torch": torch.__version__,
                               "lora_params": lora_params, "rows": rows})


if __name__ == "__main__":
    main()

"""What the GPU can hold and run, checked before a run loads anything, and what to say when it runs out of memory.

Pure functions of what torch reports (CPU-testable): the dtype the device supports, whether the engine's share of the
GPU (`--vllm_gpu_memory`) holds its weights, whether an exception is an out-of-memory error, and which field to lower
in each phase of a step.
"""

import torch

from nanorlhf.errors import UserError

GIB = 2**30
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# vLLM's start-up profiling run (activations, the sampler's float32 logits and buffers for up to max_num_seqs
# sequences: 0.6 GiB each at 1024 x a 152k vocabulary), CUDA graphs and a minimal KV cache, inside the engine's share on
# top of its weights. A rough bound read from vLLM's profiling, not measured on a GPU.
ENGINE_OVERHEAD_BYTES = 2 * GIB


def check_dtype_supported(dtype):
    """Stop before anything loads when --dtype cannot train here: float16 (no loss scaling: its gradients underflow) or
    bfloat16 on a CUDA GPU without it (Turing: T4, Titan RTX, Quadro RTX), where vLLM would fail at engine start."""
    if dtype == "float16":
        raise UserError("--dtype float16 is not supported: nanoRLHF does no loss scaling, so float16 gradients "
                        "underflow; use --dtype bfloat16, or --dtype float32 on a GPU without bfloat16")
    if dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"this GPU ({torch.cuda.get_device_name()}) has no bfloat16: use --dtype float32 (float16 "
                        "is not supported: no loss scaling)")


def engine_memory_needed(num_params, dtype):
    """Bytes the engine's share of the GPU must hold: its weights (num_params x bytes of dtype) plus vLLM's profiling
    run and a minimal KV cache (ENGINE_OVERHEAD_BYTES, an estimate)."""
    return num_params * BYTES[dtype] + ENGINE_OVERHEAD_BYTES


def check_engine_memory(num_params, dtype, vllm_gpu_memory, total_bytes=None):
    """Refuse with one sentence when --vllm_gpu_memory x the GPU cannot hold the engine's weights and its start-up
    (float32 doubles the weights: 6.2 GB at 1.5B parameters, more than 0.3 x 24 GB leaves room for); no check on a
    CPU. total_bytes: the GPU's memory (default: torch's report for this device)."""
    if total_bytes is None:
        if not torch.cuda.is_available():
            return
        total_bytes = torch.cuda.mem_get_info()[1]
    needed = engine_memory_needed(num_params, dtype)
    if vllm_gpu_memory * total_bytes >= needed:
        return
    share = -(-needed * 100 // total_bytes) / 100  # rounded up to a hundredth
    advice = f"raise --vllm_gpu_memory to at least {share:.2f}" if share < 0.9 else "use a larger GPU"
    raise UserError(f"the engine's {dtype} weights ({num_params / 1e9:.2f}B parameters, "
                    f"{num_params * BYTES[dtype] / GIB:.1f} GiB) and its start-up (about "
                    f"{ENGINE_OVERHEAD_BYTES / GIB:.0f} GiB) need {needed / GIB:.1f} GiB, more than --vllm_gpu_memory "
                    f"{vllm_gpu_memory:g} of this {total_bytes / GIB:.0f} GiB GPU gives ({vllm_gpu_memory * total_bytes / GIB:.1f}"
                    f" GiB): {advice}" + (", or use --dtype bfloat16" if dtype == "float32" else ""))


def is_out_of_memory(exc):
    """True for torch's OutOfMemoryError and for the RuntimeError vLLM's sleep-mode allocator raises when a wake-up
    cannot map its memory back (csrc/cumem_allocator.cpp: "CUDA Error: out of memory at <file>:<line>", from
    cuMemCreate); also when one of them is the cause of what was raised."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# The phase of a step (the name Run.timed gives it) -> (what ran, the fields that lower its memory).
OUT_OF_MEMORY_ADVICE = {
    # the engine is awake with its KV cache; the trainer holds its weights and adapter (Adam's moments are on the host)
    "time_generate": ("generation", "--vllm_gpu_memory (the engine's share) or --lora_r"),
    "time_eval": ("evaluation", "--vllm_gpu_memory (the engine's share) or --lora_r"),
    # the engine sleeps: its share is free, so --vllm_gpu_memory does not help; the reward model scores beside the policy
    "time_score": ("reward scoring", ("--max_new_tokens (longer completions, larger reward batches) or use a smaller "
                                      "--reward_model")),
    # the engine's weights are awake beside the whole trainer, Adam's moments included
    "time_sync": ("the weight push", "--lora_r, or use --weight_sync lora (pushes the adapter alone)"),
}
TRAINING_ADVICE = ("training", "--micro_batch_tokens or --max_new_tokens")


def out_of_memory_advice(phase):
    """(what ran, the fields to lower) for an out-of-memory error in `phase` (time_generate, time_score, ...); any
    other phase (reference, old log-probs, values, train) is the trainer's."""
    return OUT_OF_MEMORY_ADVICE.get(phase, TRAINING_ADVICE)

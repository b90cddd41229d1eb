"""The policy: a base model with a peft LoRA adapter. The reference model is the same base with the
adapter disabled, so no second copy of the weights is ever in memory.

The model stays in train mode (LoRA dropout on; transformers checkpoints a layer only when
`gradient_checkpointing and model.training`), and every pass without gradients runs inside `evaluating()`:
no dropout there, so old log-probs, the canary, the reference and the critic's values are deterministic.
"""

import weakref
from contextlib import contextmanager

import torch

from nanorlhf.errors import UserError
from nanorlhf.lora import fuse_lora_layers

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(model_name, lora_r, lora_alpha, lora_dropout=0.0, target_modules="all-linear", dtype="bfloat16",
                gradient_checkpointing=False):
    """Base causal LM (frozen) + a trainable LoRA adapter on `target_modules` ("all-linear" or "q_proj,v_proj")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=DTYPES[dtype]).to(device())
    targets = target_modules if target_modules == "all-linear" else target_modules.split(",")
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    fuse_lora_layers(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False  # the trainer never decodes: no KV cache in its forwards
    return model.train()  # from_pretrained returns eval mode, where checkpointing silently does nothing


@contextmanager
def evaluating(model):
    """No gradients and no dropout inside (no-grad passes must be deterministic); train mode again after."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


# vLLM fuses these projections into one weight (qkv_proj, gate_up_proj) and rebuilds it from the shards a push
# brings: a shard missing from the push would be overwritten with garbage.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@torch.no_grad()
def merged_weights(model, dtype=None):
    """(name, W + scale * B @ A) for every LoRA-wrapped linear, plus the untouched weights of the other shards of
    any fused vLLM module it belongs to (a LoRA on q_proj alone also pushes k_proj and v_proj), under the base
    model's Hugging Face names: exactly the tensors the rollout engine must reload after an optimizer step."""
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    names = {}  # ordered set
    for name, module in modules.items():
        if isinstance(module, LoraLayer):
            parent, _, leaf = name.rpartition(".")
            group = next((g for g in FUSED if leaf in g), (leaf,))
            names.update((f"{parent}.{shard}", None) for shard in group if f"{parent}.{shard}" in modules)
    for name in names:
        module = modules[name]
        if isinstance(module, LoraLayer):
            weight = module.base_layer.weight + module.get_delta_weight(module.active_adapters[0])
        else:
            weight = module.weight
        yield name.removeprefix("base_model.model.") + ".weight", weight.to(dtype or weight.dtype)


def adamw(params, learning_rate):
    """AdamW without weight decay, fused (one kernel for all parameters, on GPU and CPU) where torch has it."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


# optimizer -> {(id(parameter), state key): host tensor}: the pinned buffers Adam's moments live in while the engine
# generates, allocated once and reused every step (a new pinned tensor per step would grow torch's pinned-memory cache)
_HOST_BUFFERS = weakref.WeakKeyDictionary()


def move_optimizer_state(optimizer, to):
    """Move Adam's moment tensors to `to` ("cpu" while the engine generates, the GPU for the update). To the host they
    go into pinned buffers kept from step to step; state["step"] stays where the optimizer keeps it (the fused AdamW
    keeps it on the parameters' device, and it is a few bytes). On a CPU-only machine this is a no-op."""
    to = torch.device(to)
    buffers = _HOST_BUFFERS.setdefault(optimizer, {})
    copied = False
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value) or key == "step" or value.device == to:
                continue
            if to.type == "cpu":
                buffer = buffers.get((id(param), key))
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer = buffers[id(param), key] = torch.empty(value.shape, dtype=value.dtype,
                                                               pin_memory=value.is_cuda)
                state[key] = buffer.copy_(value, non_blocking=True)
                copied = True
            else:
                state[key] = value.to(to, non_blocking=True)
    if copied and torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()  # the host copies are complete before anything reads them

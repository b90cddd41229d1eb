"""The policy: a base model with a peft LoRA adapter. The reference model is the same base with the
adapter disabled, so no second copy of the weights is ever in memory."""

import torch

from nanorlhf.errors import UserError

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
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


@torch.no_grad()
def merged_weights(model, dtype=None):
    """(name, W + scale * B @ A) for every LoRA-wrapped linear, under the base model's Hugging Face names:
    exactly the tensors the rollout engine must reload after an optimizer step."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.base_layer.weight + module.get_delta_weight(module.active_adapters[0])
            yield name.removeprefix("base_model.model.") + ".weight", weight.to(dtype or weight.dtype)


def move_optimizer_state(optimizer, to):
    """Move Adam's moment tensors to `to` ("cpu" while the engine generates, the GPU for the update).
    On a CPU-only machine this is a no-op."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(to, non_blocking=True)

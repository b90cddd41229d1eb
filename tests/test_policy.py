"""The policy in the user's configuration: train mode, real gradient checkpointing, no dropout without gradients,
fused shards pushed together, importance weights. Tiny local model, no engine."""

import math

import pytest
import torch

from nanorlhf.logprobs import completion_logprobs, importance_weights
from nanorlhf.policy import evaluating, load_policy, merged_weights
from nanorlhf.tiny import build_tiny_policy

PROMPTS = [[5, 6, 7, 8], [9, 10]]
COMPLETIONS = [[11, 12, 13], [14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_policy(str(tmp_path_factory.mktemp("tiny")), ["What is 1 + 2? 3"] * 50, vocab_size=300)


def layer_calls(model):
    calls = []
    for layer in model.get_base_model().model.layers:
        # a pre-hook: torch stops a checkpointed recomputation early, once it has the tensors backward needs
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))
    return calls


@pytest.mark.parametrize("checkpointing, forwards_per_layer", [(True, 2), (False, 1)])
def test_gradient_checkpointing_recomputes_every_layer_in_backward(tiny_path, checkpointing, forwards_per_layer):
    policy = load_policy(tiny_path, 8, 16, 0.05, "all-linear", "float32", checkpointing)
    assert policy.training  # from_pretrained returns eval mode, where transformers never checkpoints
    calls = layer_calls(policy)
    out = completion_logprobs(policy, PROMPTS, COMPLETIONS, pad_id=0)
    out["logprobs"][out["mask"]].sum().backward()
    layers = policy.get_base_model().model.layers
    assert [calls.count(layer) for layer in layers] == [forwards_per_layer] * len(layers)


def test_no_dropout_without_gradients_and_dropout_with_them(tiny_path):
    policy = load_policy(tiny_path, 8, 16, 0.5, "all-linear", "float32", True)
    for _, module in policy.named_modules():  # a trained adapter (B = 0 at init would hide the dropout)
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    with evaluating(policy):
        first = completion_logprobs(policy, PROMPTS, COMPLETIONS, pad_id=0)["logprobs"]
        second = completion_logprobs(policy, PROMPTS, COMPLETIONS, pad_id=0)["logprobs"]
    assert torch.equal(first, second)
    assert policy.training  # back in train mode after
    torch.manual_seed(0)
    trained = completion_logprobs(policy, PROMPTS, COMPLETIONS, pad_id=0)["logprobs"]
    assert not torch.allclose(trained, first)  # the dropout is live where gradients are taken


def test_partial_lora_targets_push_every_shard_of_the_fused_modules(tiny_path):
    policy = load_policy(tiny_path, 8, 16, 0.0, "q_proj,v_proj", "float32", False)
    names = {name for name, _ in merged_weights(policy)}
    assert names == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")}
    policy = load_policy(tiny_path, 8, 16, 0.0, "gate_proj,o_proj", "float32", False)
    names = {name.split(".", 3)[3] for name, _ in merged_weights(policy)}
    assert names == {"mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.o_proj.weight"}


def test_importance_weights_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    vllm = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.2, 0.0]])
    # token log-ratios: [[0.5, -1.0, 0.0], [1.0, 0.2, pad]]
    weights, ratios, clipped = importance_weights(trainer, vllm, mask, "token_truncate", cap=2.0)
    expected = [[math.exp(0.5), math.exp(-1.0), 1.0], [2.0, math.exp(0.2), 0.0]]  # exp(1) = 2.72 is capped at 2
    assert weights.flatten().tolist() == pytest.approx(sum(expected, []))
    assert clipped.tolist() == [[False, False, False], [True, False, False]]
    assert ratios[1, 0].item() == pytest.approx(math.e)
    # sequence level: sums -0.5 and 1.2 -> exp(-0.5) = 0.61 and exp(1.2) = 3.32
    weights, _, clipped = importance_weights(trainer, vllm, mask, "sequence_truncate", cap=2.0)
    assert weights.flatten().tolist() == pytest.approx([math.exp(-0.5)] * 3 + [2.0, 2.0, 0.0])
    weights, _, _ = importance_weights(trainer, vllm, mask, "sequence_mask", cap=2.0)
    assert weights.flatten().tolist() == pytest.approx([math.exp(-0.5)] * 3 + [0.0] * 3)  # masked, not truncated
    weights, _, clipped = importance_weights(trainer, vllm, mask, "none", cap=2.0)
    assert weights.tolist() == mask.tolist() and not clipped.any()


def test_processed_logprobs_follow_vllms_top_p():
    """The trainer's view of the sampler with top-p: log p_T(token) - log(mass of the nucleus vLLM keeps)."""
    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1)).float()
    out = completion_logprobs(model, [[1, 2]], [[3]], pad_id=0, sampling=(0.7, 0.8))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits[0, 1] / 0.7
    probs = logits.softmax(-1)
    ascending = probs.sort().values
    kept = ascending[ascending.cumsum(0) > 1 - 0.8]  # vLLM's rule: the smallest tokens whose mass is <= 0.2 go
    assert out["sampler_logprobs"][0, 0].item() == pytest.approx(probs[3].log().item(), abs=1e-5)
    assert out["processed_logprobs"][0, 0].item() == pytest.approx((probs[3] / kept.sum()).log().item(), abs=1e-5)


def adapter_pass(path, dtype, checkpointing, dropout, fused, adapter=None):
    """Log-probs, entropy and adapter gradients of one training pass (seed 0: the same dropout masks each time) and
    the adapter's weights: given ones, or a trained-looking draw (B = 0 at init would hide the LoRA terms)."""
    from nanorlhf.lora import fuse_lora_layers

    policy = load_policy(path, 8, 16, dropout, "all-linear", dtype, checkpointing)
    if adapter is None:
        for _, module in policy.named_modules():
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
        adapter = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    policy.load_state_dict(adapter, strict=False)
    assert fuse_lora_layers(policy, fused) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    torch.manual_seed(0)
    out = completion_logprobs(policy, PROMPTS, COMPLETIONS, pad_id=0)
    ((out["logprobs"] + 0.1 * out["entropy"]) * out["mask"]).sum().backward()
    with evaluating(policy):
        no_grad = completion_logprobs(policy, PROMPTS, COMPLETIONS, pad_id=0)["logprobs"]
    values = [out["logprobs"], out["entropy"], no_grad] + [p.grad for p in policy.parameters() if p.requires_grad]
    return [v.detach().float() for v in values], adapter


def largest_error(values, reference):
    return max(((v - r).abs().max() / r.abs().max().clamp(min=1e-6)).item() for v, r in zip(values, reference))


@pytest.mark.parametrize("dtype, checkpointing, dropout", [
    ("float32", False, 0.0), ("float32", True, 0.05), ("bfloat16", True, 0.05)])  # the last: the user's configuration
def test_fused_lora_layers_compute_what_peft_does(tiny_path, dtype, checkpointing, dropout):
    """nanorlhf.lora's one-function LoRA linear against peft's own forward (log-probs, entropy, a no-grad pass and
    every adapter gradient), with the same dropout masks. In bfloat16 the two round differently (the adapter's
    matmuls run in bfloat16 here, as under autocast, in float32 in peft): there, each is compared with the float32
    computation over three seeded adapters, and the fused one must stay within bfloat16's error and about as close
    to float32 as peft's (measured over six adapters: 0.038 mean largest relative error against peft's 0.024; the
    float32-adapter version before it, 0.040; one adapter's ratio ranges 1.1-2.7x, so one draw decides nothing)."""
    errors = {"fused": [], "peft": []}
    for seed in range(3):
        torch.manual_seed(100 + seed)
        fused, adapter = adapter_pass(tiny_path, dtype, checkpointing, dropout, fused=True)
        unfused, _ = adapter_pass(tiny_path, dtype, checkpointing, dropout, fused=False, adapter=adapter)
        assert all(g.abs().max() > 0 for g in fused[3:])  # every adapter matrix got a gradient
        if dtype == "float32":
            assert largest_error(fused, unfused) < 1e-5
            return
        exact, _ = adapter_pass(tiny_path, "float32", checkpointing, dropout, fused=False, adapter=adapter)
        errors["fused"].append(largest_error(fused, exact))
        errors["peft"].append(largest_error(unfused, exact))
    assert max(errors["peft"] + errors["fused"]) < 0.1  # bfloat16's own error (and the same dropout masks)
    assert sum(errors["fused"]) < 2 * sum(errors["peft"]), errors

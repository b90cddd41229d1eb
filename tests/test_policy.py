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

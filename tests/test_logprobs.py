import random

import pytest

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nanorlhf import logprobs
from nanorlhf.logprobs import (completion_logprobs, pack_rows, packed_inputs, packing_works, padding_fraction,
                               token_budget_batches)


def tiny_model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).float()


def plain_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float() / temperature  # full (T, vocab) logits
    logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_chunked_equals_log_softmax_gather_values_and_grads():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    completions = [[11, 12, 13, 14], [15], [16, 17]]
    out = completion_logprobs(model, prompts, completions, pad_id=0, temperature=0.7, chunk_tokens=2,
                              sampling=(1.0, 1.0))
    assert out["logprobs"].shape == (3, 4)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        expected = plain_logprobs(model, p, c, 0.7)
        assert torch.allclose(out["logprobs"][b, : len(c)], expected, atol=1e-5)
        assert torch.allclose(out["sampler_logprobs"][b, : len(c)], plain_logprobs(model, p, c, 1.0), atol=1e-5)
        assert out["mask"][b].sum() == len(c)
    # gradients through the checkpointed chunks equal the plain computation's
    out["logprobs"][out["mask"]].sum().backward()
    chunked_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    sum(plain_logprobs(model, p, c, 0.7).sum() for p, c in zip(prompts, completions)).backward()
    assert torch.allclose(chunked_grad, model.model.embed_tokens.weight.grad, atol=1e-5)


def lora_model(dtype=torch.float32, checkpointing=False):
    from peft import LoraConfig, get_peft_model

    base = tiny_model().to(dtype)
    if checkpointing:  # as load_policy does: the decoder layers rerun in backward
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0: give the adapter an effect, so its gradients all matter
            torch.nn.init.normal_(param, std=0.05)
    return model


def outputs_and_grads(model, prompts, completions, **kwargs):
    model.zero_grad()
    out = completion_logprobs(model, prompts, completions, pad_id=0, temperature=0.7, chunk_tokens=8,
                              sampling=(0.7, 0.9), **kwargs)
    (out["logprobs"] * out["mask"]).sum().backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


class CheckpointedHead(torch.nn.Linear):
    """Not a plain nn.Linear: completion_logprobs takes its fallback path (each chunk checkpointed)."""


# (dtype, gradient checkpointing, tolerance on log-probs, relative tolerance on gradients). Packing changes the matmul
# shapes, so a CPU with native bf16 kernels (AVX512-BF16) rounds differently: measured there, log-probs 1.4e-3 and
# gradients 1.9e-3 apart (identical where torch upcasts bf16 matmuls). bf16's epsilon is 2^-7 = 7.8e-3; a packing bug
# (sequences of a row attending to each other) gives 0.6 and 0.7, so 1e-2 separates rounding from a bug.
@pytest.mark.parametrize("dtype, checkpointing, atol, rtol", [(torch.float32, False, 1e-5, 1e-5),
                                                               (torch.bfloat16, True, 1e-2, 1e-2)])
def test_packed_micro_batch_equals_padded_one_values_and_grads(dtype, checkpointing, atol, rtol, monkeypatch):
    """Issue 14: packing (shared rows, position_ids restarting) and the fused LM head must give the padded,
    checkpointed path's log-probs, entropy, sampler view and gradients, to float tolerance; also in the user's
    bf16 + gradient checkpointing configuration. The padded path passes no attention mask: with one it computes
    the same."""
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randrange(2, 9))] for _ in range(9)]
    completions = [[rng.randrange(1, 300) for _ in range(rng.randrange(1, 20))] for _ in range(9)]
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    assert len(pack_rows(lengths, max(lengths))) < len(lengths)  # rows really are shared
    model = lora_model(dtype, checkpointing)
    packed, packed_grads = outputs_and_grads(model, prompts, completions, packed=True)
    padded, padded_grads = outputs_and_grads(model, prompts, completions, packed=False)
    head = model.get_base_model().lm_head
    head.__class__ = CheckpointedHead
    fallback, fallback_grads = outputs_and_grads(model, prompts, completions, packed=False)
    head.__class__ = torch.nn.Linear
    monkeypatch.setattr(logprobs, "MASK_PADDING", True)
    masked, masked_grads = outputs_and_grads(model, prompts, completions, packed=False)
    monkeypatch.undo()
    assert torch.allclose(masked["logprobs"], padded["logprobs"], rtol=0, atol=atol)
    assert (masked_grads - padded_grads).norm() <= rtol * masked_grads.norm()
    for other, other_grads in ((padded, padded_grads), (fallback, fallback_grads)):
        assert torch.equal(packed["mask"], other["mask"])
        for key in ("logprobs", "entropy", "sampler_logprobs", "processed_logprobs"):
            assert torch.allclose(packed[key], other[key], atol=atol), (key, (packed[key] - other[key]).abs().max())
        assert torch.equal(packed["canary_mask"], other["canary_mask"])
        assert (packed_grads - other_grads).norm() <= rtol * other_grads.norm(), \
            ((packed_grads - other_grads).norm() / other_grads.norm())
    assert padded_grads.norm() > 0
    with torch.no_grad():  # the no-grad passes: entropy computed in place, or left out when not asked for
        nograd = completion_logprobs(model, prompts, completions, pad_id=0, temperature=0.7, chunk_tokens=8)
        lean = completion_logprobs(model, prompts, completions, pad_id=0, temperature=0.7, entropy=False)
    assert torch.allclose(nograd["entropy"], packed["entropy"], atol=atol)
    assert "entropy" not in lean and torch.allclose(lean["logprobs"], packed["logprobs"], atol=atol)


def test_packed_rows_restart_positions_and_detect_models_that_ignore_them(monkeypatch):
    input_ids, position_ids, starts = packed_inputs([[1, 2, 3], [4, 5], [6], [7, 8, 9]], pad_id=0, width=3)
    assert input_ids.tolist() == [[1, 2, 3], [7, 8, 9], [4, 5, 6]]
    assert position_ids.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 0]]
    assert starts == [(0, 0), (2, 0), (2, 2), (1, 0)]
    model = tiny_model().eval()
    assert packing_works(model, 0)
    # an attention that reads no packing from position_ids lets a sequence see the one before it in its row
    import transformers.masking_utils

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_works(model, 0)


def test_packed_micro_batches_fit_the_budget_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(20, 700) for _ in range(64)]
    padded, packed = token_budget_batches(lengths, 4096), token_budget_batches(lengths, 4096, packed=True)
    assert sorted(i for b in packed for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 4096 or len(b) == 1 for b in packed)
    model = tiny_model()  # sdpa: rows as wide as the longest sequence; flash-attention: one row per micro-batch
    assert padding_fraction(packed, lengths, model) < padding_fraction(packed, lengths)
    model.config._attn_implementation = "flash_attention_2"
    assert padding_fraction(packed, lengths, model) < 0.01 < padding_fraction(padded, lengths)


def test_micro_batches_cover_every_sample_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.choice([10, 20, 50, 400]) + rng.randint(0, 9) for _ in range(200)]
    budget = 512
    batches = token_budget_batches(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= budget or len(b) == 1
    assert padding_fraction(batches, lengths) < 0.1  # sorting by length keeps padding small


def test_sample_longer_than_budget_gets_its_own_batch():
    batches = token_budget_batches([100, 5, 5], budget=50)
    assert [0] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]

import random

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nanorlhf.logprobs import completion_logprobs, padding_fraction, token_budget_batches


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

"""Per-token log-probs of completion tokens, without ever holding full (B, T, vocab) fp32 logits.

The backbone runs once on the padded batch; only the hidden states of positions that predict a
completion token are kept (padding and prompt positions never reach the LM head), and the LM head +
log-softmax run over them in chunks of `chunk_tokens`. With gradients, each chunk is checkpointed, so
backward recomputes that chunk's logits instead of storing them: peak memory is one chunk's logits.
"""

import torch
from torch.utils.checkpoint import checkpoint


def token_budget_batches(lengths, budget):
    """Split sample indices into micro-batches whose padded size (count x longest) fits `budget` tokens.

    Samples are sorted longest first so that neighbours have similar lengths and padding stays small;
    a sample longer than the budget gets a micro-batch of its own. Every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(batches, lengths):
    """Share of the padded token slots that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def right_pad(sequences, pad_id):
    """(B, L) input_ids and attention_mask of token-id lists padded on the right. The mask hides the padding and
    no output at a padded position is read, so any valid id does: pad_id None (a tokenizer without a pad token)
    pads with 0."""
    lengths = [len(s) for s in sequences]
    input_ids = torch.full((len(sequences), max(lengths)), 0 if pad_id is None else pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, s in enumerate(sequences):
        input_ids[b, : lengths[b]] = torch.tensor(s)
        attention_mask[b, : lengths[b]] = 1
    return input_ids, attention_mask


def _nucleus_log_mass(logits, top_p):
    """log of the probability mass vLLM keeps with top-p (per row of tempered fp32 logits (n, vocab)): sorted
    ascending, a token survives when the cumulative probability up to and including it exceeds 1 - top_p, and
    the most likely token always does (vllm/v1/sample/ops/topk_topp_sampler.py)."""
    probs = logits.softmax(-1).sort(-1).values  # (n, vocab) ascending
    kept = probs.cumsum(-1) > 1 - top_p
    kept[:, -1] = True
    return (probs * kept).sum(-1).log()


# vLLM's top-p nucleus needs a sort over the vocabulary: at Qwen's 151k vocabulary that costs about a third of a
# training step (H100, benchmarks/gpu_check.py), so the canary measures it on one token in CANARY_STRIDE.
CANARY_STRIDE = 8


def _chunk_logprobs(lm_head, hidden, targets, temperature, sampling):
    """Written so that at most two (chunk, vocab) fp32 tensors are alive at once (three with top-p < 1)."""
    logits = lm_head(hidden).float()  # (chunk, vocab)
    sampler = processed = measured = None
    if sampling is not None:  # the sampler's view, no grad: log-probs at its temperature, and after its top-p
        sample_temperature, top_p = sampling
        with torch.no_grad():
            tempered = logits / sample_temperature
            sampler = tempered.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            processed, measured = sampler, torch.ones_like(sampler, dtype=torch.bool)
            if top_p < 1.0:
                rows = slice(None, None, CANARY_STRIDE)
                processed, measured = sampler.clone(), torch.zeros_like(measured)
                processed[rows] -= _nucleus_log_mass(tempered[rows], top_p)
                measured[rows] = True
            del tempered
    if temperature != 1.0:
        logits = logits.div_(temperature)
    logprobs = logits.log_softmax(-1)  # its backward needs only its output: the logits can go
    del logits
    token_logprobs = logprobs.gather(-1, targets[:, None])[:, 0]
    with torch.no_grad():
        entropy = -logprobs.exp().mul_(logprobs).sum(-1)
    if sampling is None:
        sampler = processed = entropy
        measured = torch.zeros_like(entropy, dtype=torch.bool)
    return token_logprobs, entropy, sampler, processed, measured


def completion_logprobs(model, prompts, completions, pad_id, temperature=1.0, chunk_tokens=128, sampling=None):
    """Log-probs of each completion token given its prompt and the completion tokens before it.

    prompts, completions: lists of token-id lists. Returns (B, C) tensors, C = longest completion:
    `logprobs` of log_softmax(logits / temperature) (differentiable when grad is enabled), `entropy`
    (no grad) and the (B, C) `mask` of real completion tokens. With `sampling=(temperature, top_p)` of the
    engine, also (no grad) `sampler_logprobs` = log_softmax(logits / T_sampling) and `processed_logprobs`,
    the same renormalised over vLLM's top-p nucleus: what vLLM reports with logprobs_mode="processed_logprobs"
    (with top-p < 1 only on the tokens of `canary_mask`, one in CANARY_STRIDE).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    input_ids, attention_mask = right_pad([p + c for p, c in zip(prompts, completions)], pad_id)
    rows, cols, widths = [], [], []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        rows += [b] * len(c)
        cols += range(len(p) - 1, len(p) + len(c) - 1)  # position t predicts token t + 1
        widths.append(len(c))
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # use_cache=False: a training forward must not build a KV cache (and checkpointing refuses to keep one)
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    hidden = hidden[rows_t, cols_t]  # (N, H): only positions that predict a completion token
    targets = input_ids[rows_t, cols_t + 1]  # (N,)
    lm_head = causal_lm.get_output_embeddings()
    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        args = (lm_head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens], temperature,
                sampling)
        pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _chunk_logprobs(*args))
    flat = [torch.cat(parts) for parts in zip(*pieces)]  # logprobs, entropy, sampler, processed, measured: (N,)
    mask = torch.zeros(len(prompts), max(widths), dtype=torch.bool, device=device)
    for b, w in enumerate(widths):
        mask[b, :w] = True
    out = {}
    for key, values in zip(("logprobs", "entropy", "sampler_logprobs", "processed_logprobs", "canary_mask"), flat):
        padded = torch.zeros(mask.shape, dtype=values.dtype, device=device)
        out[key] = padded.masked_scatter(mask, values)
    out["mask"] = mask
    if sampling is None:
        del out["sampler_logprobs"], out["processed_logprobs"], out["canary_mask"]
    return out


def importance_weights(sampler_logprobs, vllm_logprobs, mask, mode="token_truncate", cap=2.0):
    """Truncated importance weights that correct for the engine sampling from a slightly different distribution
    than the trainer's (other kernels, bf16), as trl (vllm_importance_sampling_correction) and verl
    (rollout_correction) do. All (B, C); the log-ratio of token t of a completion is

        d_t = logp_trainer_t - logp_vllm_t               (the policy that sampled, seen by both)
        token_truncate:    w_t = min(exp(d_t), C)
        sequence_truncate: w_t = min(exp(sum_t d_t), C)                   (same weight on every token)
        sequence_mask:     w_t = exp(sum_t d_t) if exp(sum_t d_t) <= C else 0
        none:              w_t = 1

    Returns (weights (B, C), ratios (B, C) before truncation, clipped (B, C) bool); padding gets weight 0.
    """
    log_ratio = (sampler_logprobs - vllm_logprobs) * mask
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
    ratio = log_ratio.clamp(max=20.0).exp()  # exp(20): far above any cap, and never inf
    if mode == "none":
        weights = torch.ones_like(ratio)
    elif mode == "sequence_mask":
        weights = ratio * (ratio <= cap)
    else:
        weights = ratio.clamp(max=cap)
    clipped = (ratio > cap) & mask.bool() if mode != "none" else torch.zeros_like(mask, dtype=torch.bool)
    return weights * mask, ratio * mask, clipped


IS_MODES = ("token_truncate", "sequence_truncate", "sequence_mask", "none")

"""Per-token log-probs of completion tokens, without ever holding full (B, T, vocab) fp32 logits.

The backbone runs once per micro-batch. Its sequences are packed (`pack_rows`): several share a row (as wide as the
longest on sdpa and eager, the whole micro-batch on flash-attention: `row_width`), position_ids restarting at each
sequence, from which transformers builds a block-causal mask (sdpa, eager) or variable-length attention (flash,
flex), so there is almost no padding; a model that cannot (`packing_works`), and a micro-batch whose sequences
would each fill a row alone, get right-padded rows, with no attention mask (causal attention never looks right of a
token, so the real tokens do not see the padding without one, and sdpa runs its causal kernel with no mask tensor).
Only the hidden states of positions that predict a completion token are kept (padding and prompt positions never
reach the LM head), and the LM head + log-softmax run over them in chunks of `chunk_tokens`. With gradients no
chunk's logits are kept: `_HeadLogprobs` computes the log-probs, the entropy, the sampler's view and the log-probs'
gradients with respect to the hidden states in one pass, so backward has no logits to recompute: peak memory is one
chunk's logits.
"""

import torch
from torch.utils.checkpoint import checkpoint


def pack_rows(lengths, width):
    """First-fit decreasing: lists of sample indices whose lengths add up to at most `width` (at least the longest),
    longest first."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def row_width(model, lengths):
    """How wide to make the packed rows of a micro-batch: the longest sequence where attention computes every
    pair of a row, masked or not (sdpa, eager: on CPU rows twice as wide made a step 1.2x slower at hidden 512,
    benchmarks/train_phase.py); the whole micro-batch in one row where it skips the pairs of different
    sequences (flash-attention's variable-length kernels, flex)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = str(causal_lm.config._attn_implementation)
    return sum(lengths) if "flash" in implementation or implementation == "flex_attention" else max(lengths)


def token_budget_batches(lengths, budget, packed=False):
    """Split sample indices into micro-batches of at most `budget` tokens.

    Samples are sorted longest first, so neighbours have similar lengths. Padded, a micro-batch takes count x
    longest token slots; `packed`, its samples share rows (`packed_inputs`) and the budget counts their tokens
    (the rows' unused tails come on top). A sample longer than the budget gets a micro-batch of its own. Every
    index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, tokens = [], [], 0
    for i in order:
        size = tokens + lengths[i] if packed else (len(current) + 1) * lengths[current[0] if current else i]
        if current and size > budget:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(current)
    return batches


def padding_fraction(batches, lengths, model=None):
    """Share of the micro-batches' token slots that are padding: rows x width, one row per sample when padded
    (model None), packed rows (`row_width` of this model) otherwise."""
    slots = 0
    for b in batches:
        sizes = [lengths[i] for i in b]
        width = max(sizes) if model is None else row_width(model, sizes)
        slots += (len(sizes) if model is None else len(pack_rows(sizes, width))) * width
    return 1.0 - sum(lengths) / slots if slots else 0.0


# True in benchmarks/train_phase.py's padded baseline only: right padding with its attention mask, which a causal
# model does not need (without it: the same outputs, and sdpa may take its causal kernel; see docs/performance.md)
MASK_PADDING = False


def right_pad(sequences, pad_id):
    """(B, L) input_ids and attention_mask of token-id lists padded on the right. No real token attends to the
    padding (causal attention looks left) and no output at a padded position is read, so any valid id does: pad_id
    None (a tokenizer without a pad token) pads with 0."""
    lengths = [len(s) for s in sequences]
    input_ids = torch.full((len(sequences), max(lengths)), 0 if pad_id is None else pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, s in enumerate(sequences):
        input_ids[b, : lengths[b]] = torch.tensor(s)
        attention_mask[b, : lengths[b]] = 1
    return input_ids, attention_mask


def packed_inputs(sequences, pad_id, width):
    """(R, W) input_ids and position_ids of the sequences packed into rows of `width` tokens (`pack_rows`), and
    `starts`: the (row, column) of each sequence's first token. The unused tail of a row restarts its positions
    too, so it is a sequence of its own that no real token attends to."""
    rows = pack_rows([len(s) for s in sequences], width)
    input_ids = torch.full((len(rows), width), 0 if pad_id is None else pad_id, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    starts = [None] * len(sequences)
    for r, row in enumerate(rows):
        column = 0
        for b in row:
            n = len(sequences[b])
            input_ids[r, column : column + n] = torch.tensor(sequences[b])
            position_ids[r, column : column + n] = torch.arange(n)
            starts[b] = (r, column)
            column += n
        position_ids[r, column:] = torch.arange(width - column)
    return input_ids, position_ids, starts


def completion_states(model, prompts, completions, pad_id, packed=True):
    """The backbone's last hidden states at the positions that predict each completion token: (N, H), N = all
    completion tokens in order, with their (N,) `targets` (the token each position predicts) and the (B, C)
    `mask` that places them (C = longest completion). `model` is a causal LM (peft-wrapped or not)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    sequences = [p + c for p, c in zip(prompts, completions)]
    lengths = [len(s) for s in sequences]
    width = row_width(model, lengths) if packed else 0
    if packed and len(pack_rows(lengths, width)) == len(sequences):
        # one sequence a row (lengths that all run to the limit): padding does the same work, and its mask is
        # cheaper than the block-causal one built from position_ids (0.86-0.90x the tokens/s packed on CPU)
        packed = False
    if packed:
        input_ids, position_ids, starts = packed_inputs(sequences, pad_id, width)
        inputs = {"position_ids": position_ids.to(device)}
    else:
        input_ids, attention_mask = right_pad(sequences, pad_id)
        inputs = {"attention_mask": attention_mask.to(device)} if MASK_PADDING else {}  # causal: see the docstring
        starts = [(b, 0) for b in range(len(sequences))]
    rows, cols = [], []
    for (row, column), p, c in zip(starts, prompts, completions):
        rows += [row] * len(c)
        cols += range(column + len(p) - 1, column + len(p) + len(c) - 1)  # position t predicts token t + 1
    input_ids = input_ids.to(device)
    # use_cache=False: a training forward must not build a KV cache (and checkpointing refuses to keep one)
    hidden = causal_lm.get_decoder()(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    mask = torch.zeros(len(prompts), max(map(len, completions)), dtype=torch.bool, device=device)
    for b, c in enumerate(completions):
        mask[b, : len(c)] = True
    return hidden[rows_t, cols_t], input_ids[rows_t, cols_t + 1], mask


@torch.no_grad()
def packing_works(model, pad_id):
    """Whether packed rows keep sequences apart in this model: the log-probs of a sequence must not change when
    the sequence packed before it in the same row does (they do where the attention ignores position_ids).
    Call it with dropout off (nanorlhf.policy.evaluating)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0)).tolist()
    # the 12-token sequence sets the row width; the two 6-token ones share a row, `before` first
    seen = [completion_logprobs(model, [tokens[0][:4], before[:3], tokens[3][:3]],
                                [tokens[0][4:], before[3:6], tokens[3][3:6]], pad_id)["logprobs"][2]
            for before in tokens[1:3]]
    return torch.allclose(*seen, rtol=0, atol=1e-3)


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


def _chunk_logprobs(logits, targets, temperature, sampling, head_weight=None, entropy=True):
    """Everything read off one chunk's fp32 logits (chunk, vocab): the targets' log-probs at `temperature`
    (differentiable when grad is on), the entropy (None with entropy=False), the sampler's view (no grad), and
    with `head_weight` (vocab, hidden) the gradient of each target's log-prob with respect to the hidden state that
    made its logits (else None). Written so that at most two (chunk, vocab) fp32 tensors are alive at once (three
    with top-p < 1)."""
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
    direction = None
    with torch.no_grad():
        probs = logprobs.exp() if entropy or head_weight is not None else None
        if not entropy:
            entropy = None
        elif logprobs.requires_grad:  # log_softmax's backward needs logprobs: a row-wise dot, no third tensor
            entropy = -(probs[:, None, :] @ logprobs[:, :, None]).view(-1)
        else:  # in place: 3x faster than that batched dot on CPU
            entropy = -logprobs.mul_(probs).sum(-1)
        del logprobs
        if head_weight is not None:  # d log_softmax(h W^T / T)_y / dh = (onehot(y) - softmax) W / T
            probs.mul_(-1 / temperature)[torch.arange(len(targets), device=targets.device), targets] += 1 / temperature
            direction = probs.to(head_weight.dtype) @ head_weight
        del probs
    return token_logprobs, entropy, sampler, processed, measured, direction


class _HeadLogprobs(torch.autograd.Function):
    """_chunk_logprobs(hidden @ weight.T) of one chunk with gradients. Each target's log-prob depends on its own
    hidden state alone, so the forward also computes its gradient with respect to that state (one (chunk, vocab) x
    (vocab, hidden) matmul) and keeps only that: backward scales it by the incoming gradient, with no logits to
    recompute. A head whose weight is trained too keeps (hidden, weight, targets) instead, and its backward
    recomputes the logits once. Checkpointing the chunk would rerun the entropy and the sampler's view in backward
    as well."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, sampling, entropy):
        ctx.temperature, ctx.dtype = temperature, hidden.dtype
        ahead = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        *out, direction = _chunk_logprobs(torch.nn.functional.linear(hidden, weight).float(), targets, temperature,
                                          sampling, head_weight=weight if ahead else None, entropy=entropy)
        ctx.save_for_backward(*((direction,) if ahead else (hidden, weight, targets)))
        ctx.mark_non_differentiable(*(t for t in out[1:] if t is not None))
        return tuple(out)

    @staticmethod
    def backward(ctx, grad, *unused):
        if len(ctx.saved_tensors) == 1:
            (direction,) = ctx.saved_tensors
            return (grad[:, None] * direction).to(ctx.dtype), None, None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        logits = torch.nn.functional.linear(hidden, weight).float()
        grad_logits = logits.div_(ctx.temperature).softmax(-1)  # (chunk, vocab)
        del logits
        grad_logits.mul_(-grad[:, None])[torch.arange(len(targets)), targets] += grad
        grad_logits = grad_logits.div_(ctx.temperature).to(weight.dtype)
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.T @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def completion_logprobs(model, prompts, completions, pad_id, temperature=1.0, chunk_tokens=128, sampling=None,
                        packed=True, entropy=True):
    """Log-probs of each completion token given its prompt and the completion tokens before it.

    prompts, completions: lists of token-id lists. Returns (B, C) tensors, C = longest completion:
    `logprobs` of log_softmax(logits / temperature) (differentiable when grad is enabled), `entropy`
    (no grad) and the (B, C) `mask` of real completion tokens. With `sampling=(temperature, top_p)` of the
    engine, also (no grad) `sampler_logprobs` = log_softmax(logits / T_sampling) and `processed_logprobs`,
    the same renormalised over vLLM's top-p nucleus: what vLLM reports with logprobs_mode="processed_logprobs"
    (with top-p < 1 only on the tokens of `canary_mask`, one in CANARY_STRIDE). `packed=False` pads instead of
    packing (for a model where `packing_works` is False). `entropy=False` leaves the entropy out (a pass that does
    not report it saves a vocabulary-wide exp and product per token).
    """
    hidden, targets, mask = completion_states(model, prompts, completions, pad_id, packed)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_head = causal_lm.get_output_embeddings()
    plain_head = type(lm_head) is torch.nn.Linear and lm_head.bias is None  # not LoRA-wrapped, no bias
    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        chunk, chunk_targets = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if not torch.is_grad_enabled():
            pieces.append(_chunk_logprobs(lm_head(chunk).float(), chunk_targets, temperature, sampling,
                                          entropy=entropy)[:5])
        elif plain_head:
            pieces.append(_HeadLogprobs.apply(chunk, lm_head.weight, chunk_targets, temperature, sampling, entropy))
        else:  # checkpointed: backward recomputes the chunk's logits
            pieces.append(checkpoint(lambda h, t: _chunk_logprobs(lm_head(h).float(), t, temperature, sampling,
                                                                  entropy=entropy)[:5],
                                     chunk, chunk_targets, use_reentrant=False))
    out = {}
    # logprobs, entropy, sampler, processed, measured: (N,) each, None where not asked for
    for key, parts in zip(("logprobs", "entropy", "sampler_logprobs", "processed_logprobs", "canary_mask"),
                          zip(*pieces)):
        if parts[0] is not None:
            values = torch.cat(parts)
            out[key] = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device).masked_scatter(mask, values)
    out["mask"] = mask
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

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


def _chunk_logprobs(lm_head, hidden, targets, temperature, with_raw):
    """Written so that at most two (chunk, vocab) fp32 tensors are alive at once."""
    logits = lm_head(hidden).float()  # (chunk, vocab)
    raw = None
    if with_raw:
        with torch.no_grad():
            raw = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    if temperature != 1.0:
        logits = logits.div_(temperature)
    logprobs = logits.log_softmax(-1)  # its backward needs only its output: the logits can go
    del logits
    token_logprobs = logprobs.gather(-1, targets[:, None])[:, 0]
    with torch.no_grad():
        entropy = -logprobs.exp().mul_(logprobs).sum(-1)
    if raw is None:
        raw = token_logprobs.detach() if temperature == 1.0 else torch.zeros_like(entropy)
    return token_logprobs, entropy, raw


def completion_logprobs(model, prompts, completions, pad_id, temperature=1.0, chunk_tokens=128, with_raw=False):
    """Log-probs of each completion token given its prompt and the completion tokens before it.

    prompts, completions: lists of token-id lists. Returns (B, C) tensors, C = longest completion:
    `logprobs` of log_softmax(logits / temperature) (differentiable when grad is enabled), `entropy`
    (no grad), `raw` = log_softmax(logits) (temperature 1, what vLLM reports; only if with_raw), and
    the (B, C) `mask` of real completion tokens.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    input_ids = torch.full((len(prompts), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    rows, cols, widths = [], [], []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, : lengths[b]] = torch.tensor(p + c)
        attention_mask[b, : lengths[b]] = 1
        rows += [b] * len(c)
        cols += range(len(p) - 1, len(p) + len(c) - 1)  # position t predicts token t + 1
        widths.append(len(c))
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    hidden = hidden[rows_t, cols_t]  # (N, H): only positions that predict a completion token
    targets = input_ids[rows_t, cols_t + 1]  # (N,)
    lm_head = causal_lm.get_output_embeddings()
    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        args = (lm_head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens], temperature, with_raw)
        pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _chunk_logprobs(*args))
    flat = [torch.cat(parts) for parts in zip(*pieces)]  # logprobs, entropy, raw: each (N,)
    mask = torch.zeros(len(prompts), max(widths), dtype=torch.bool, device=device)
    for b, w in enumerate(widths):
        mask[b, :w] = True
    out = {}
    for key, values in zip(("logprobs", "entropy", "raw"), flat):
        padded = torch.zeros(mask.shape, dtype=values.dtype, device=device)
        out[key] = padded.masked_scatter(mask, values)
    out["mask"] = mask
    if not with_raw:
        del out["raw"]
    return out

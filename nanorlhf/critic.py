"""The critic (value model) for PPO: a second LoRA adapter, named "critic", on the policy's own frozen base
model, plus a linear value head on the last hidden states. No second copy of the base is ever in memory.

peft keeps one adapter active at a time, and `set_adapter` also makes only the active one trainable, so
the critic's adapter is switched on only inside `Critic.active()` and the policy's ("default") is active
everywhere else: the policy's log-probs, its optimizer's gradient clipping and the merged weights pushed
into the engine (`merged_weights` reads the active adapter) never see the critic.
"""

import copy
from contextlib import contextmanager

import torch

from nanorlhf import distributed
from nanorlhf.logprobs import completion_states
from nanorlhf.policy import adamw, device, evaluating, move_optimizer_state

POLICY, CRITIC = "default", "critic"


def per_token(batch, micro_batches, fn):
    """(B, C) tensor of fn(mb) -> (b, c) computed micro-batch by micro-batch, without gradients (run it inside
    nanorlhf.policy.evaluating: no dropout)."""
    out = torch.zeros(len(batch), max(map(len, batch.completion_ids)), device=device())
    for idx in micro_batches:
        values = fn(batch.select(idx, device()))
        out[torch.tensor(idx, device=out.device), : values.shape[1]] = values.float()
    return out


class AdapterWeights:
    """state_dict / load_state_dict of one named peft adapter, so `run.register` checkpoints it: the run's
    checkpoint restores only the policy's adapter (peft's save_pretrained writes the others to
    subfolders, but nothing reads them back)."""

    def __init__(self, model, adapter_name):
        self.model, self.adapter_name = model, adapter_name

    def state_dict(self):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)

    def load_state_dict(self, state):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state, adapter_name=self.adapter_name)


class ValueScale(torch.nn.Module):
    """The critic's output V = shift + scale * head(h), so that the head regresses targets of unit size whatever
    the reward's scale. The algorithm sets it once (`set`); until then V = head(h). Buffers, so it is checkpointed
    with the run and never trained."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def set(self, shift, scale):
        self.shift.fill_(shift)
        self.scale.fill_(scale)
        self.fitted.fill_(True)


class Critic:
    """V(prompt, completion[:t]) for every completion token t: the critic adapter's last hidden state at the
    position that predicts token t, through `head`, a Linear(hidden, 1) that starts at zero, and `value_scale`:
    V = shift + scale * head(h). A zero head predicts the constant `shift` (explained variance exactly 0), where
    PyTorch's default init predicts noise of the hidden states' size (issue 30, SmolLM2-135M: explained variance
    -12.8 before any fit, -23 after 10 rounds at lr 1e-4). Its own AdamW trains the critic adapter and the head."""

    def __init__(self, policy, pad_id, learning_rate, max_grad_norm, packed=True):
        self.policy, self.pad_id, self.max_grad_norm, self.packed = policy, pad_id, max_grad_norm, packed
        policy.add_adapter(CRITIC, copy.deepcopy(policy.peft_config[POLICY]))  # same rank and targets as the policy
        hidden_size = policy.get_base_model().config.hidden_size
        self.head = torch.nn.Linear(hidden_size, 1).to(device())
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.value_scale = ValueScale().to(device())
        with self.active():
            self.trainable = [p for p in policy.parameters() if p.requires_grad] + list(self.head.parameters())
        self.optimizer = adamw(self.trainable, learning_rate)

    def checkpointed(self):
        """What `run.register` must save for an exact resume: head, output scale, critic adapter, critic optimizer.
        (A checkpoint written before the scale existed has none: V = head(h), as it was trained.)"""
        return {"value_head": self.head, "value_scale": self.value_scale,
                "critic_adapter": AdapterWeights(self.policy, CRITIC), "critic_optimizer": self.optimizer}

    @contextmanager
    def active(self):
        """The critic adapter on (and trainable) inside, the policy's back on after."""
        self.policy.set_adapter(CRITIC)
        try:
            yield
        finally:
            self.policy.set_adapter(POLICY)

    def values(self, mb):
        """(b, c) values of one micro-batch (call inside `active()`), 0 on padding."""
        hidden, _, mask = completion_states(self.policy, mb.prompt_ids, mb.completion_ids, self.pad_id, self.packed)
        scale = self.value_scale
        values = scale.shift + scale.scale * self.head(hidden.float()).squeeze(-1)  # (N,): the state before each token
        return torch.zeros(mask.shape, dtype=values.dtype, device=mask.device).masked_scatter(mask, values)

    def predict(self, batch, micro_batches):
        """(B, C) values of a whole batch, no gradients and no dropout (the critic's old values)."""
        with self.active(), evaluating(self.policy):
            return per_token(batch, micro_batches, self.values)

    def update(self, batch, micro_batches, loss_fn, epochs=1):
        """`epochs` optimizer steps of the critic on the whole batch, each accumulating gradients over the
        micro-batches. loss_fn(values, mb) -> (loss, {stat: token mean}) must already divide by the whole
        batch's normaliser. Returns the loss (mean over epochs) and the stats averaged over tokens."""
        sums, loss_sum, tokens = {}, 0.0, 0
        with self.active():
            move_optimizer_state(self.optimizer, device())
            for epoch in range(epochs):
                for idx in micro_batches:
                    mb = batch.select(idx, device())
                    loss, stats = loss_fn(self.values(mb), mb)
                    loss.backward()
                    loss_sum += loss.item() / epochs
                    n_tokens = sum(map(len, mb.completion_ids))
                    tokens += n_tokens
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * n_tokens
                # torchrun: each rank's loss is divided by the global normaliser, so the sum is the whole batch's
                distributed.all_reduce_gradients(self.trainable)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
                if not torch.isfinite(grad_norm):  # a non-finite loss or gradient is never learned from
                    self.optimizer.zero_grad(set_to_none=True)
                    break
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            move_optimizer_state(self.optimizer, "cpu")  # off the GPU while the engine generates
        loss_sum, tokens = distributed.total(loss_sum), distributed.total(tokens)  # the whole batch's (torchrun)
        sums = {k: distributed.total(sums[k]) for k in sorted(sums)}
        return {"value_loss": loss_sum, "value_grad_norm": grad_norm.item(),
                **{k: v / max(tokens, 1) for k, v in sums.items()}}

"""The update of a step: the policy's log-probs in token-budget micro-batches (no-grad passes for the reference and
the sampler's view, with gradients for the loss), the importance weights trainer/sampler and the canary, the epochs
of optimizer steps, the skip of a non-finite step, and the step's training stats (summed over torchrun's ranks).

The loss itself is the algorithm's (each script's compute_loss); this module only feeds it micro-batches.
"""

import math

import torch

from nanorlhf import console, distributed
from nanorlhf.logprobs import completion_logprobs, importance_weights, padding_fraction, token_budget_batches
from nanorlhf.policy import device, evaluating, move_optimizer_state


def cosine_schedule(optimizer, total_steps, floor=0.1, warmup_steps=0):
    """Learning rate rises linearly to its peak over `warmup_steps` optimizer steps (the first at peak / warmup_steps),
    then decays to floor x peak along a half cosine over the remaining steps. warmup_steps below 1 is a fraction of
    total_steps (as in transformers 5)."""
    warmup = round(warmup_steps * total_steps) if 0 < warmup_steps < 1 else int(warmup_steps)

    def factor(t):
        if t < warmup:
            return (t + 1) / warmup
        progress = min((t - warmup) / max(total_steps - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SamplerView:
    """The sampler's view of a batch, filled micro-batch by micro-batch: old log-probs (the policy the engine
    sampled from, at its temperature and top-p), importance weights, and the sums behind the canary (vLLM vs
    trainer log-probs of the sampled tokens) and the importance-ratio stats. Sums stay on the device until the end."""

    def __init__(self, batch, cfg):
        self.cfg = cfg
        batch.old_logprobs = torch.zeros(batch.vllm_logprobs.shape, device=device())
        batch.is_weights = torch.zeros(batch.vllm_logprobs.shape, device=device())
        self.batch = batch
        self.sums = {"canary": 0.0, "canary_tokens": 0, "ratio": 0.0, "ratio_max": torch.zeros(()), "clipped": 0.0}

    def observe(self, idx, mb, out):
        """Record micro-batch idx's view from a pass with sampling=True; returns (old log-probs, weights)."""
        mask, sums = out["mask"], self.sums
        weights, ratios, clipped = importance_weights(out["sampler_logprobs"], mb.vllm_logprobs, mask,
                                                      self.cfg.vllm_is_correction, self.cfg.vllm_is_cap)
        rows, width = torch.tensor(idx, device=device()), mask.shape[1]
        self.batch.old_logprobs[rows, :width] = out["sampler_logprobs"]
        self.batch.is_weights[rows, :width] = weights
        measured = out["canary_mask"]
        sums["canary"] += ((out["processed_logprobs"] - mb.vllm_logprobs).abs() * measured).sum()
        sums["canary_tokens"] += measured.sum()
        sums["ratio"] += ratios.sum()
        sums["ratio_max"] = torch.maximum(sums["ratio_max"], ratios.max())
        sums["clipped"] += clipped.sum()
        return out["sampler_logprobs"], weights

    def stats(self, tokens):
        """The canary and importance-ratio stats over the whole batch (every rank's, under torchrun: `tokens` is
        the whole batch's count of completion tokens)."""
        s = {k: float(v) for k, v in self.sums.items()}
        if distributed.world_size() > 1:
            s["ratio_max"] = distributed.maximum(s["ratio_max"])
            s.update({k: distributed.total(s[k]) for k in ("canary", "canary_tokens", "ratio", "clipped")})
        return {"logprob_diff": s["canary"] / max(s["canary_tokens"], 1), "is_ratio_mean": s["ratio"] / max(tokens, 1),
                "is_ratio_max": s["ratio_max"], "is_clipped_fraction": s["clipped"] / max(tokens, 1)}


class Update:
    """The policy's optimisation for one run. timed(name): the run's phase timer; times: the step's timings (the
    training tokens/s reads time_train). `stepped`: the optimizer stepped in the current step (the run resets it);
    `engine_stale`: the engine's weights are behind the trainer's (sync() pushes and clears it)."""

    def __init__(self, cfg, policy, optimizer, scheduler, pad_id, packed, timed, times):
        self.cfg, self.policy, self.optimizer, self.scheduler = cfg, policy, optimizer, scheduler
        self.pad_id, self.packed, self.timed, self.times = pad_id, packed, timed, times
        self.step, self.stepped, self.engine_stale = None, False, False
        self.skipped_steps, self.skipped_in_a_row = 0, 0

    def begin(self, step):
        """A new step starts: nothing of it has stepped the optimizer yet."""
        self.step, self.stepped = step, False

    def micro_batches(self, batch, grad=True):
        """Token-budget micro-batches of the batch and their padding fraction. Without gradients nothing is kept
        for backward, so the budget is micro_batch_tokens_nograd (default 4 x micro_batch_tokens)."""
        lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        budget = self.cfg.micro_batch_tokens if grad else self.cfg.micro_batch_tokens_nograd or \
            4 * self.cfg.micro_batch_tokens
        batches = token_budget_batches(lengths, budget, self.packed)
        return batches, padding_fraction(batches, lengths, self.policy if self.packed else None)

    def logprobs(self, mb, temperature=None, sampling=False, entropy=True):
        """completion_logprobs of micro-batch mb at `temperature` (default: the sampling one); sampling=True adds the
        sampler's view (sampler_logprobs, processed_logprobs) at the engine's temperature and top-p. `mask` and
        `canary_mask` keep the tokens the model sampled only (the batch's loss_mask: a multi-turn episode's tool
        tokens carry no loss, importance weight, KL, entropy or canary), and `logprobs` is 0 elsewhere."""
        out = completion_logprobs(self.policy, mb.prompt_ids, mb.completion_ids, self.pad_id,
                                  self.cfg.temperature if temperature is None else temperature,
                                  sampling=(self.cfg.temperature, self.cfg.top_p) if sampling else None,
                                  packed=self.packed, entropy=entropy)
        if "loss_mask" in mb:  # (a Batch from make_batch always has it)
            model = mb.loss_mask.to(out["mask"].device).bool()
            out["mask"] = out["mask"] & model
            if "canary_mask" in out:
                out["canary_mask"] = out["canary_mask"] & model
            out["logprobs"] = out["logprobs"] * model
        return out

    def reference_logprobs(self, batch, temperature=None):
        """(B, C) log-probs under the reference policy: the same base model with the LoRA adapter disabled."""
        with self.policy.disable_adapter():
            return self.policy_logprobs(batch, temperature)

    def policy_logprobs(self, batch, temperature=None):
        """(B, C) log-probs of the sampled tokens under the current policy, no grad and no dropout (0 on padding).
        Timed as time_reference, with the other no-grad passes before the update."""
        out = torch.zeros(batch.vllm_logprobs.shape, device=device())
        batches, _ = self.micro_batches(batch, grad=False)
        with self.timed("time_reference"), evaluating(self.policy):
            for idx in batches:
                lp = self.logprobs(batch.select(idx, device()), temperature, entropy=False)["logprobs"]
                out[torch.tensor(idx, device=out.device), : lp.shape[1]] = lp
        return out

    def update(self, batch, loss_fn, epochs=1, temperature=None):
        """`epochs` optimizer steps on the whole batch, each accumulating gradients over token-budget
        micro-batches. loss_fn(logprobs, entropy, mb) -> (loss, {stat: token mean}) sees one micro-batch `mb`
        with `completion_mask`, `old_logprobs` (the policy the engine sampled from, at the sampling temperature,
        no grad) and `is_weights` (importance weights trainer/sampler, nanorlhf.logprobs.importance_weights, that
        multiply the policy-gradient term of each token), and its loss must already be divided by the whole
        batch's normaliser. `temperature`: of the log-probs the loss sees (default the sampling temperature).
        Returns the loss, the stats averaged over tokens, the logprob canary (vLLM vs trainer log-probs of the
        sampled tokens, same distribution) and the importance-weight stats."""
        if distributed.total(len(batch)) == 0:  # sparse GRPO dropped every completion: nothing to learn from this step
            return {"loss": 0.0, "micro_batches": 0}
        batches, pad = self.micro_batches(batch)
        view = SamplerView(batch, self.cfg)
        # Without dropout, epoch 0's forward runs the very policy the engine sampled from: the sampler's view comes
        # with it for free. With dropout it needs its own pass without dropout (and without gradients).
        separate = self.cfg.lora_dropout > 0
        if separate:
            with self.timed("time_old_logprobs"), evaluating(self.policy):
                for idx in self.micro_batches(batch, grad=False)[0]:
                    mb = batch.select(idx, device())
                    view.observe(idx, mb, self.logprobs(mb, sampling=True, entropy=False))
        with self.timed("time_train"):
            move_optimizer_state(self.optimizer, device())
            loss, grad_norm, sums = self._epochs(batch, batches, loss_fn, epochs, temperature,
                                                 view=None if separate else view)
        tokens = int(batch.loss_mask.sum()) if "loss_mask" in batch else sum(map(len, batch.completion_ids))
        sums = {k: float(v) for k, v in sums.items()}
        if distributed.world_size() > 1:  # the whole batch's stats: sums over the ranks
            keys = sorted(set().union(*distributed.gather_objects(list(sums))))
            sums = {k: distributed.total(sums.get(k, 0.0)) for k in keys}
            tokens = distributed.total(tokens)
        stats = {k: v / max(tokens * epochs, 1) for k, v in sums.items()}
        trained_tokens = epochs * sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
        stats.update(loss=loss, grad_norm=grad_norm.item(), skipped_steps=self.skipped_steps,
                     padding_fraction=pad, micro_batches=len(batches), **view.stats(tokens),
                     lr=self.scheduler.get_last_lr()[0],
                     train_tokens_per_second=trained_tokens / self.times["time_train"],
                     # what the dropped samples (sparse) would have cost at the measured speed: an estimate
                     time_saved_sparse=distributed.total(batch.dropped_tokens) * epochs * self.times["time_train"]
                     / max(distributed.total(trained_tokens), 1))
        return stats

    def _epochs(self, batch, batches, loss_fn, epochs, temperature, view):
        """The optimizer steps: (mean loss over epochs, last gradient norm, {stat: token-weighted sum}). view: the
        SamplerView to fill from epoch 0's forward (None when a separate pass filled it). A non-finite loss or
        gradient norm is never learned from: that epoch and the rest are skipped, and counted."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        sums, loss_sum, skipped = {}, 0.0, False
        for epoch in range(epochs):
            epoch_loss = 0.0
            for idx in batches:
                mb = batch.select(idx, device())
                out = self.logprobs(mb, temperature, sampling=epoch == 0 and view is not None)
                mb.completion_mask = out["mask"]
                if epoch == 0 and view is not None:
                    mb.old_logprobs, mb.is_weights = view.observe(idx, mb, out)
                loss, stats = loss_fn(out["logprobs"], out["entropy"], mb)
                loss.backward()
                epoch_loss += loss.detach()
                n_tokens = out["mask"].sum()  # the tokens the model sampled; on the device: no host sync here
                stats["entropy"] = (out["entropy"] * out["mask"]).sum() / n_tokens.clamp(min=1)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * n_tokens
            # torchrun: every rank's loss is divided by the global normaliser, so the sums are the whole batch's
            epoch_loss = distributed.total(float(epoch_loss))
            distributed.all_reduce_gradients(params)
            loss_sum += epoch_loss / epochs
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            if not (math.isfinite(epoch_loss) and torch.isfinite(grad_norm)):  # never learn from it
                self.optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.stepped = self.engine_stale = True
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.skipped_steps += skipped
        if skipped:
            what = "this step's optimizer step and weight push" if not self.stepped else \
                f"the optimizer steps from epoch {epoch + 1} of {epochs} on"
            console.say(f"warning: step {self.step}: loss {epoch_loss:.4g}, gradient norm {grad_norm.item():.4g}; skipped {what} "
                        f"({self.skipped_in_a_row} in a row; the run stops at --max_skipped_steps "
                        f"{self.cfg.max_skipped_steps})", err=True)
        return loss_sum, grad_norm, sums

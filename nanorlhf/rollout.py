"""The rollout of a step: completions from the engine, their rewards, and the Batch the update learns from; and the
greedy evaluation, which goes the same way.

Every engine call goes through `_engine_call`: the trainer's optimizer state leaves the GPU while the engine holds
it, and the engine sleeps again afterwards. A reward function that raises, hangs or returns a bad value stops the run
(one sentence) after the last completed step is saved.
"""

import torch

from nanorlhf import distributed
from nanorlhf.errors import UserError
from nanorlhf.multiturn import conversation
from nanorlhf.policy import move_optimizer_state


class Batch(dict):
    """Per-sample data of one step: token-id lists and (B,) or (B, C) tensors, C = longest completion.
    `batch.x` reads `batch["x"]`; `select(idx)` slices every entry together (and trims C to the slice)."""

    __getattr__ = dict.__getitem__

    def __setattr__(self, key, value):
        self[key] = value

    def __len__(self):
        return len(self["completion_ids"])

    def select(self, idx, device=None):
        width = max(len(self["completion_ids"][i]) for i in idx)
        index = torch.tensor(idx)
        out = Batch()
        for key, value in self.items():
            if torch.is_tensor(value):
                value = value[index.to(value.device)].to(device or value.device)
                out[key] = value[:, :width] if value.dim() == 2 else value
            elif isinstance(value, list):
                out[key] = [value[i] for i in idx]
            else:
                out[key] = value
        return out


def make_batch(prompts, completions, keep=None, **per_sample):
    """A Batch of the kept completions with their prompts, the sampler's log-probs and any (N,) or (N, ...)
    per-sample tensors; `dropped_tokens` counts what was left out (sparse)."""
    idx = [i for i in range(len(completions)) if keep is None or keep[i]]
    width = max([len(completions[i].token_ids) for i in idx] + [1])
    vllm_logprobs, loss_mask = torch.zeros(len(idx), width), torch.zeros(len(idx), width)
    for row, i in enumerate(idx):
        vllm_logprobs[row, : len(completions[i].logprobs)] = torch.tensor(completions[i].logprobs)
        # 1 on the tokens the model sampled: all of a single-turn completion, not a multi-turn episode's tool tokens
        loss_mask[row, : len(completions[i].token_ids)] = torch.tensor(getattr(completions[i], "loss_mask", None)
                                                                       or [1.0] * len(completions[i].token_ids))
    # an --environment episode's prompt may carry reset()'s message (nanorlhf/multiturn.py)
    prompt_ids = [getattr(c, "prompt_ids", None) or prompts[c.prompt_index]["token_ids"] for c in completions]
    total_tokens = sum(len(p) + len(c.token_ids) for p, c in zip(prompt_ids, completions))
    batch = Batch(
        prompt_ids=[prompt_ids[i] for i in idx],
        completion_ids=[completions[i].token_ids for i in idx],
        vllm_logprobs=vllm_logprobs,
        loss_mask=loss_mask,
    )
    batch.dropped_tokens = total_tokens - sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
    for key, value in per_sample.items():
        batch[key] = value[torch.tensor(idx, dtype=torch.long)] if torch.is_tensor(value) else [value[i] for i in idx]
    return batch


def samples(prompts, completions, rewards, parts, count=4):
    """Rows of the samples table: the first completion of each of the first `count` prompts, with its rewards."""
    rows, seen = [], set()
    for i, c in enumerate(completions):
        if c.prompt_index in seen or len(seen) == count:
            continue
        seen.add(c.prompt_index)
        rows.append({"prompt": prompts[c.prompt_index]["text"], "completion": c.text, "reward": rewards[i].item(),
                     **{f"reward_{name}": values[i].item() for name, values in parts.items()},
                     "length": len(c.token_ids), "truncated": bool(c.truncated),
                     **({"messages": conversation(c)} if hasattr(c, "messages") else {})})
    return rows


def model_tokens(completion):
    """How many of a completion's tokens the model sampled (a multi-turn episode's tool tokens left out)."""
    mask = getattr(completion, "loss_mask", None)
    return int(sum(mask)) if mask is not None else len(completion.token_ids)


def tool_metrics(completions):
    """The step's tool metrics (rank 0's and every rank's, under torchrun), {} for completions without tools."""
    if not completions or not hasattr(completions[0], "turns"):
        return {}
    counts = torch.tensor([[c.turns, c.tool_calls, c.tool_failures, c.tool_truncations, len(c.token_ids),
                            model_tokens(c)] for c in completions], dtype=torch.float)
    counts = distributed.gather(counts)
    return {"turns_mean": counts[:, 0].mean().item(), "tool_calls_mean": counts[:, 1].mean().item(),
            "tool_failures": int(counts[:, 2].sum()), "tool_truncated_results": int(counts[:, 3].sum()),
            "tool_token_fraction": 1 - counts[:, 5].sum().item() / max(counts[:, 4].sum().item(), 1)}


class Rollout:
    """Generation and scoring for one run. timed(name): the run's phase timer; times: the step's timings, where the
    generated token count is summed; failed(together): the run's save-and-say before an error stops it."""

    def __init__(self, cfg, engine, optimizer, rewards, timed, times, failed, multiturn=None):
        self.cfg, self.engine, self.optimizer, self.rewards = cfg, engine, optimizer, rewards
        self.timed, self.times, self.failed = timed, times, failed
        self.multiturn = multiturn  # with tools: nanorlhf.multiturn.MultiTurn, episodes of several turns

    def _engine_call(self, phase, prompts, n, seed, with_greedy=False, **kwargs):
        with self.timed(phase):
            move_optimizer_state(self.optimizer, "cpu")
            if self.multiturn is None:
                completions = self.engine.generate([p["token_ids"] for p in prompts], n, seed,
                                                   self.cfg.max_new_tokens, with_greedy=with_greedy, **kwargs)
            else:  # ReMax's greedy baseline episodes come from a rollout of their own, listed after the sampled ones
                completions = self.multiturn.episodes(prompts, n, seed, **kwargs)
                if with_greedy:
                    completions += self.multiturn.episodes(prompts, 1, 0, greedy=True,
                                                           first_index=kwargs.get("first_index", 0))
            self.engine.sleep()
        return completions

    def generate(self, prompts, n, seed, with_greedy=False):
        """n completions per prompt from the engine (prompt-major); with_greedy: also one greedy completion per
        prompt from the same batch, returned as a second list."""
        completions = self._engine_call("time_generate", prompts, n, seed, temperature=self.cfg.temperature,
                                        top_p=self.cfg.top_p, with_greedy=with_greedy,
                                        first_index=prompts[0].get("index", 0) if prompts else 0)
        tokens = sum(map(model_tokens, completions))  # summed over the step's calls (GRPO's dynamic sampling)
        self.times["generated_tokens"] = self.times.get("generated_tokens", 0) + tokens
        if with_greedy:
            return completions[: len(prompts) * n], completions[len(prompts) * n :]
        return completions

    def score(self, prompts, completions):
        """(rewards (N,), {reward name: (N,)}) for the completions of `prompts` (prompt-major)."""
        rows = [prompts[c.prompt_index] for c in completions]
        fields = {k: [r["fields"][k] for r in rows] for k in rows[0]["fields"]} if rows else {}
        if self.multiturn is not None:  # the whole conversation of each episode (over a dataset column so named)
            fields["messages"] = [c.messages for c in completions]
            if self.multiturn.environment:  # each episode's own instance (the environment's reward() reads it)
                fields["environments"] = [c.environment for c in completions]
        error = None
        try:
            rewards = self.rewards([r["text"] for r in rows], [c.text for c in completions], fields)
        except UserError as e:
            error = e
        # under torchrun every rank scores at this point: all of them stop here together, so they can save together
        if distributed.any_rank(error is not None):
            message, _, frames = str(error or "another rank's reward failed (its message names it)").partition("\n")
            raise UserError(f"{message}. {self.failed(together=True)}" + (f"\n{frames}" if frames else "")) from None
        return rewards

    @torch.no_grad()
    def evaluate(self, eval_prompts):
        """Greedy completions of the evaluation prompts, scored by the run's rewards (with a 0/1 reward such
        as a math verifier, eval_reward_mean is the accuracy)."""
        first, count = distributed.shard(len(eval_prompts))  # under torchrun each rank takes its share
        prompts = eval_prompts[first : first + count]
        completions = self._engine_call("time_eval", prompts, 1, 0, greedy=True)
        with self.timed("time_eval"):
            rewards, parts = self.score(prompts, completions)  # timed as eval, not as the step's score
        lengths = distributed.gather(torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float))
        parts = {name: distributed.gather(values) for name, values in parts.items()}
        return {"eval_reward_mean": distributed.gather(rewards).mean().item(),
                **{f"eval_reward_{name}": values.mean().item() for name, values in parts.items()},
                "eval_response_length_mean": lengths.mean().item(),
                **{f"eval_{k}": v for k, v in tool_metrics(completions).items()}}

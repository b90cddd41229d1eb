"""The rollout engine: one vLLM `LLM`, built once per run, in this process, that trades the GPU with the trainer.

Per step: `wake_up()` -> `push_weights(...)` (the trainer's updated weights, in place: no disk, no
rebuild) -> `generate(...)` -> `sleep()`. On GPU, sleeping releases the KV cache and offloads the
engine's weights so the trainer has the memory; on CPU vLLM's sleep is a no-op, but it is still called.
"""

import dataclasses
import logging
import os

# In-process engine: no engine subprocess (a colocated trainer must share the process, and a script
# without a __main__ guard would die in vLLM's spawn).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; else vLLM's CPU backend reserves a large share of RAM
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# A LoRA push reloads only the linear layers, and vLLM warns about every other weight on each push. A filter
# (unlike a level) survives vLLM's logging reconfiguration.
for _module in ("inplace", "layerwise"):
    logging.getLogger(f"vllm.model_executor.model_loader.reload.{_module}").addFilter(
        lambda record: record.levelno >= logging.ERROR)


@dataclasses.dataclass
class Completion:
    prompt_index: int  # which prompt of the step's batch this completion answers
    token_ids: list  # sampled completion tokens (EOS included when the model stopped by itself)
    text: str
    logprobs: list  # vLLM's raw (temperature 1) log-prob of each sampled token: the logprob canary's reference
    truncated: bool  # hit max_new_tokens without stopping


class RolloutEngine:
    builds = 0  # LLM constructions in this process; a run must keep it at 1 (logged as engine_builds)

    def __init__(self, model, max_model_len, dtype="bfloat16", gpu_memory_utilization=0.3, seed=0):
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        self.llm = LLM(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.on_gpu,
            enable_prefix_caching=True,  # the G completions of a prompt share its KV cache
            # On CPU a chunked prefill of a seeded request crashes vLLM ("CPU Generator does not use
            # offset"), so every prompt is prefilled whole there.
            enable_chunked_prefill=self.on_gpu,
            max_num_batched_tokens=None if self.on_gpu else max(max_model_len, 8192),
            seed=seed,
        )
        self.asleep = False
        RolloutEngine.builds += 1

    def generate(self, prompt_token_ids, n, seed, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False,
                 with_greedy=False):
        """Sample n completions per prompt; returns a prompt-major list (prompt 0's n, then prompt 1's, ...).
        `greedy`: decode greedily instead. `with_greedy`: also one greedy completion per prompt, in the same
        batch (one wake-up, the prompts' KV shared), listed after all the sampled ones.

        Every completion is its own request with its own seed drawn from `seed`, so a step's samples are
        all different, a new `seed` (base seed + step) gives new samples, and a rerun gives the same ones.
        """
        from vllm import SamplingParams

        self.wake_up()
        seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(prompt_token_ids) * n)
        sampled = [(i, 0.0 if greedy else temperature, 1.0 if greedy else top_p, int(seeds[i * n + j]))
                   for i in range(len(prompt_token_ids)) for j in range(n)]
        greedy_extra = [(i, 0.0, 1.0, 0) for i in range(len(prompt_token_ids))] if with_greedy else []
        requests = [(i, SamplingParams(n=1, max_tokens=max_new_tokens, temperature=t, top_p=p, seed=s,
                                       logprobs=0))  # logprobs=0: the sampled token's own log-prob only
                    for i, t, p, s in sampled + greedy_extra]
        outputs = self.llm.generate([{"prompt_token_ids": list(prompt_token_ids[i])} for i, _ in requests],
                                    [params for _, params in requests], use_tqdm=False)
        completions = []
        for (prompt_index, _), out in zip(requests, outputs):
            sample = out.outputs[0]
            completions.append(
                Completion(
                    prompt_index=prompt_index,
                    token_ids=list(sample.token_ids),
                    text=sample.text,
                    logprobs=[lp[t].logprob for lp, t in zip(sample.logprobs, sample.token_ids)],
                    truncated=sample.finish_reason == "length",
                )
            )
        return completions

    @torch.no_grad()
    def push_weights(self, named_tensors):
        """Load (hf_name, tensor) pairs into the running engine in place. All shards of a fused vLLM module
        (q/k/v, gate/up) must come in the same call, or the fused weight goes out of step."""
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def sleep(self):
        """Free the GPU for training: drop the KV cache and offload the weights (level 1). No-op on CPU."""
        if self.on_gpu and not self.asleep:
            self.llm.sleep(level=1)
        self.asleep = True

    def wake_up(self):
        if self.on_gpu and self.asleep:
            self.llm.wake_up()
        self.asleep = False

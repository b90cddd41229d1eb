"""The rollout engine: one vLLM `LLM`, built once per run, in this process, that trades the GPU with the trainer.

Per step: `push_weights(...)` (wakes the weights alone and streams the trainer's updated ones in place, a layer at a
time: no disk, no rebuild) -> `generate(...)` (wakes the KV cache) -> `sleep()`. On GPU, sleeping releases the KV
cache and offloads the engine's weights (and its CUDA graphs) so the trainer has the memory; waking the weights before
the KV cache keeps the push's peak memory down. `sleeping` is the engine's record of what is offloaded, kept equal to
vLLM's own (tests/test_engine.py compares them on CPU, where vLLM's sleep frees nothing but keeps the same record).
With `--weight_sync lora` the engine is built with vLLM's LoRA and `push_lora(...)` replaces `push_weights(...)`:
the adapter's A and B alone, in memory, served by vLLM's LoRA kernels on top of the untouched base weights.
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

from nanorlhf.errors import UserError  # noqa: E402

if not torch.cuda.is_available():
    # vLLM's CPU backend compiles the model at every engine start, and its AOT compile cache never loads there (the
    # artifact is a plain function: "'function' object has no attribute 'finalize_loading'"); its older compile
    # cache does, which saves about 5 s of each start after the first (measured: engine init 9.2 s -> 5.1 s).
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

# A LoRA push reloads only the linear layers, and vLLM warns about every other weight on each push. A filter
# (unlike a level) survives vLLM's logging reconfiguration.
for _module in ("inplace", "layerwise"):
    logging.getLogger(f"vllm.model_executor.model_loader.reload.{_module}").addFilter(
        lambda record: record.levelno >= logging.ERROR)
# --weight_sync lora: every LoRA request reminds that a LoRA may not bring its own tokenizer (ours never does).
logging.getLogger("vllm.v1.engine.input_processor").addFilter(
    lambda record: "tokenizers for different LoRAs" not in record.getMessage())


@dataclasses.dataclass
class Completion:
    prompt_index: int  # which prompt of the step's batch this completion answers
    token_ids: list  # sampled completion tokens (EOS included when the model stopped by itself)
    text: str
    logprobs: list  # log-prob of each sampled token under the distribution it was drawn from (temperature, top-p)
    truncated: bool  # hit max_new_tokens without stopping


SLEEP_TAGS = ("weights", "kv_cache")  # what vLLM's level-1 sleep offloads (weights) or drops (KV cache)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def completion_seeds(seed, count):
    """The sampling seeds of a step's first `count` completions (global order: prompt-major), drawn from `seed`."""
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 1, size=count)]


def weight_sync_mode(weight_sync, dtype, device_type="cuda"):
    """How updates reach the engine: merged or lora. auto: merged in float32 (both syncs are exact there and merged
    generates faster) and on a CPU (vLLM-CPU's LoRA path generated 12x slower than the merged model on SmolLM2-135M,
    with the same canary over a real-model run); lora in bf16/fp16 on a GPU, where a merged push rounds away small
    updates that the trainer still sees and vLLM's LoRA kernels are cheap (docs/performance.md, "Update fidelity in
    bfloat16" and "The real model in bf16")."""
    if weight_sync != "auto":
        return weight_sync
    return "merged" if dtype == "float32" or device_type == "cpu" else "lora"


def engine_lora_rank(lora_r):
    """The smallest max_lora_rank vLLM accepts that holds a rank-`lora_r` adapter (--weight_sync lora)."""
    for rank in LORA_RANKS:
        if rank >= lora_r:
            return rank
    raise UserError(f"--lora_r {lora_r} is above {LORA_RANKS[-1]}, the largest LoRA rank vLLM serves: lower "
                    "--lora_r or use --weight_sync merged")


def engine_max_num_seqs(prompts_per_step, group_size, world_size=1, eval_count=0, tp_size=1):
    """The most sequences one generate() call asks of an engine: a rank's share of the step's prompts x (group_size + 1)
    (one greedy completion per prompt rides along with with_greedy) or its share of the evaluation prompts (one greedy
    each), times the ranks that pool their prompts into one engine (tensor parallel). vLLM sizes its CUDA-graph capture
    (up to 2 x max_num_seqs) and the sampler's per-sequence buffers from it; its default (1024 on an H100) is far more."""
    share = -(-prompts_per_step // world_size)  # ceil: shares differ by at most one
    return tp_size * max(share * (group_size + 1), -(-eval_count // world_size), 1)


def _load_lora_tensors(worker, lora_id, tensors, peft_config):
    """Runs on the vLLM worker (via collective_rpc): serve an adapter built from in-memory tensors, the only one.
    vLLM's own loader (vllm/lora/worker_manager.py, _load_adapter) reads the same tensors from a folder."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(peft_config)
    helper.validate_legal(manager.lora_config)
    mapper = getattr(manager._adapter_manager.model, "hf_to_vllm_mapper", None)  # renamed modules (e.g. Qwen2-VL)
    lora = LoRAModel.from_lora_tensors(lora_id, tensors, helper, device="cpu", dtype=manager.lora_config.lora_dtype,
                                       model_vocab_size=manager.vocab_size,
                                       weights_mapper=mapper and mapper.get_rename_mapper())
    manager.remove_all_adapters()  # the previous step's adapter: memory stays flat
    manager._adapter_manager.add_adapter(lora)  # activated by the first request that names lora_id


class RolloutEngine:
    builds = 0  # LLM constructions in this process; a run must keep it at 1 (logged as engine_builds)

    def __init__(self, model, max_model_len, dtype="bfloat16", gpu_memory_utilization=0.3, seed=0, max_lora_rank=0,
                 external_launcher=False, tp_group=None, max_num_seqs=None, sleep_mode=None):
        """max_lora_rank > 0 (one of LORA_RANKS): serve the policy through vLLM's LoRA kernels, the adapter
        pushed by push_lora(); 0: the engine holds merged weights, pushed by push_weights(). external_launcher: this
        process is one rank of torchrun (nanorlhf/distributed.py) and the engine lives in this process; tp_group: the
        torch.distributed group of the ranks that share this engine (tensor parallel), None when it is this rank's own.
        max_num_seqs: the most sequences one generate() asks for (engine_max_num_seqs); None: vLLM's default.
        sleep_mode: sleep and wake through vLLM (default: on a GPU, where it frees memory; one such engine per process,
        vLLM's sleep-mode allocator is a singleton). On a CPU vLLM's sleep frees nothing but keeps its record.
        """
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        self.sleep_mode = self.on_gpu if sleep_mode is None else sleep_mode
        self.dtype = getattr(torch, dtype)
        lora = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1) if max_lora_rank else {}
        gpu = {}
        if self.on_gpu and self.sleep_mode:
            # the CUDA graphs go to the pool that sleep offloads: else they stay on the GPU through training
            gpu["sleep_mode_offload_cudagraph"] = True
        self.llm = LLM(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.on_gpu and self.sleep_mode,
            enable_prefix_caching=True,  # the G completions of a prompt share its KV cache
            # On CPU a chunked prefill of a seeded request crashes vLLM ("CPU Generator does not use
            # offset"), so every prompt is prefilled whole there.
            enable_chunked_prefill=self.on_gpu,
            max_num_batched_tokens=None if self.on_gpu else max(max_model_len, 8192),
            seed=seed,
            # log-probs after temperature and top-p: the sampler's own distribution, what the importance weights
            # and the canary compare the trainer with (raw ones would be at temperature 1)
            logprobs_mode="processed_logprobs",
            **({"distributed_executor_backend": "external_launcher"} if external_launcher else {}),
            tensor_parallel_size=torch.distributed.get_world_size(tp_group) if tp_group is not None else 1,
            **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),
            **lora,
            **gpu,
        )
        self.tp_group = tp_group
        self.lora_request = None  # the adapter every generate() uses, set by push_lora()
        self.pushed_bytes = 0  # size of the last push
        self.sleeping = set()  # what is offloaded: "weights", "kv_cache"
        self.prefix_cache_stale = False
        RolloutEngine.builds += 1

    def generate(self, prompt_token_ids, n, seed, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False,
                 with_greedy=False, first_index=0, seeds=None):
        """Sample n completions per prompt; returns a prompt-major list (prompt 0's n, then prompt 1's, ...).
        `greedy`: decode greedily instead. `with_greedy`: also one greedy completion per prompt, in the same
        batch (one wake-up, the prompts' KV shared), listed after all the sampled ones.

        Every completion is its own request with its own seed drawn from `seed`, so a step's samples are
        all different, a new `seed` (base seed + step) gives new samples, and a rerun gives the same ones.
        `first_index`: the position of prompt 0 in the step's whole batch (a rank's share starts there), so that
        completion j of prompt p gets the same seed whatever the number of ranks.
        Multi-turn episodes (nanorlhf/multiturn.py) continue with n=1, `seeds` (one per prompt, in place of those
        drawn from `seed`) and `max_new_tokens` a list (each episode's budget left).
        """
        from vllm import SamplingParams

        mine = len(prompt_token_ids)
        if self.tp_group is not None:  # the ranks sharing this engine pool their prompts: one batch, each its own back
            shares = [None] * torch.distributed.get_world_size(self.tp_group)
            torch.distributed.all_gather_object(shares, (list(prompt_token_ids), first_index, seeds, max_new_tokens),
                                                group=self.tp_group)
            offset = sum(len(share[0]) for share in shares[: torch.distributed.get_rank(self.tp_group)])
            prompt_token_ids = [ids for share in shares for ids in share[0]]
            first_index = next((share[1] for share in shares if share[0]), 0)  # the shares are contiguous
            if seeds is not None:
                seeds = [s for share in shares for s in share[2]]
            if isinstance(max_new_tokens, list):
                max_new_tokens = [m for share in shares for m in share[3]]
        if not prompt_token_ids:
            return []
        self.wake_up()
        if self.prefix_cache_stale:  # cached prompt KV was computed with the old weights
            self.llm.reset_prefix_cache()
            self.prefix_cache_stale = False
        if seeds is None:
            drawn = completion_seeds(seed, (first_index + len(prompt_token_ids)) * n)
            seeds = [drawn[(first_index + i) * n + j] for i in range(len(prompt_token_ids)) for j in range(n)]
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_token_ids)
        sampled = [(i, 0.0 if greedy else temperature, 1.0 if greedy else top_p, seeds[i * n + j])
                   for i in range(len(prompt_token_ids)) for j in range(n)]
        greedy_extra = [(i, 0.0, 1.0, 0) for i in range(len(prompt_token_ids))] if with_greedy else []
        requests = [(i, SamplingParams(n=1, max_tokens=budgets[i], temperature=t, top_p=p, seed=s,
                                       logprobs=0))  # logprobs=0: the sampled token's own log-prob only
                    for i, t, p, s in sampled + greedy_extra]
        outputs = self.llm.generate([{"prompt_token_ids": list(prompt_token_ids[i])} for i, _ in requests],
                                    [params for _, params in requests], use_tqdm=False,
                                    lora_request=self.lora_request)
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
        if self.tp_group is not None:
            completions = [dataclasses.replace(c, prompt_index=c.prompt_index - offset) for c in completions
                           if offset <= c.prompt_index < offset + mine]
        return completions

    @torch.no_grad()
    def push_weights(self, named_tensors):
        """Load (hf_name, tensor) pairs into the running engine in place, streamed: `named_tensors` may be a generator
        (policy.merged_weights), consumed one tensor at a time, so only the layer being loaded is materialised. All
        shards of a fused vLLM module (q/k/v, gate/up) must come in the same call, or the fused weight goes out of step;
        vLLM holds a fused module's shards until the last one arrives (a module whose bias is not pushed, such as
        Qwen2's qkv, until the end of the call), so shards should come next to each other, layer by layer."""
        self.wake_up(["weights"])  # the KV cache stays released until generate(): lower peak memory
        self.pushed_bytes = 0

        def counted():
            for name, tensor in named_tensors:
                self.pushed_bytes += tensor.numel() * tensor.element_size()
                yield name, tensor

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        self.prefix_cache_stale = True

    @torch.no_grad()
    def push_lora(self, adapter_tensors, peft_config):
        """Serve a new LoRA adapter through vLLM's LoRA kernels: `adapter_tensors` is peft's state dict
        (`...q_proj.lora_A.weight` -> tensor), `peft_config` its LoraConfig as a dict. The tensors go straight to
        the worker's LoRA manager (no disk), copied (the trainer goes on updating its own) under a new id, so
        that vLLM never serves a cached adapter; the previous one is removed."""
        from vllm.lora.request import LoRARequest

        self.wake_up(["weights"])  # removing the old adapter clears its slot in the engine's LoRA buffers
        tensors = {name: t.detach().to(self.dtype, copy=True) for name, t in adapter_tensors.items()}
        lora_id = self.lora_request.lora_int_id + 1 if self.lora_request else 1
        self.llm.collective_rpc(_load_lora_tensors, args=(lora_id, tensors, peft_config))
        # lora_path is never read (the adapter is already loaded) but vLLM requires one
        self.lora_request = LoRARequest(f"policy-{lora_id}", lora_id, lora_path="in-memory")
        self.pushed_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def sleep(self):
        """Free the GPU for training: drop the KV cache and offload the weights (level 1). Whatever is awake goes to
        sleep, the weights alone included (a push followed by an empty share of prompts)."""
        if self.sleeping != set(SLEEP_TAGS):
            if self.sleep_mode:
                self.llm.sleep(level=1)  # vLLM skips what already sleeps
            self.sleeping = set(SLEEP_TAGS)

    def close(self):
        """Shut the engine down and release its memory, for a process that builds another one after it (benchmarks).
        On a GPU a sleep-mode engine's pool must be empty before another sleep-mode engine starts in this process."""
        import gc

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    def wake_up(self, tags=SLEEP_TAGS):
        tags = [tag for tag in tags if tag in self.sleeping]
        if self.sleep_mode and tags:
            self.llm.wake_up(tags=tags)
        self.sleeping -= set(tags)

